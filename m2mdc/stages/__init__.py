"""Pipeline stages; importing this package registers them in pipeline order."""

from m2mdc.stages import (  # noqa: F401
    compare,
    distill,
    export,
    finetune_teacher,
    profile,
    prune,
    quantize,
    score,
    slice,
)
