"""unidad_dist: distributed Uni-DAD training (few-step distillation + few-shot domain adaptation)."""

__version__ = "0.1.0"

from unidad_dist.device import prepare_deepspeed_env as _prepare_deepspeed_env

_prepare_deepspeed_env()  # before anything (transformers, diffusers) imports DeepSpeed and guesses
