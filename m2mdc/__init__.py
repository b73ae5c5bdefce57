"""m2mdc: config-driven experiment runner for MI-guided block pruning, residual-safe slicing
and staged knowledge distillation (M2M-DC)."""

__version__ = "0.1.0"
