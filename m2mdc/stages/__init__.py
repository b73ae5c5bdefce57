"""Pipeline stages; importing this package registers them in pipeline order."""

from m2mdc.stages import distill, finetune_teacher, profile, prune, score, slice  # noqa: F401
