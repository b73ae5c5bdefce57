"""``python -m m2mdc``: the ``m2mdc`` command (also ``torchrun -m m2mdc run ...``)."""

from m2mdc.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
