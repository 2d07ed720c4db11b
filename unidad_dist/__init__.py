"""unidad_dist: distributed Uni-DAD training (few-step distillation + few-shot domain adaptation).

Importing the package loads nothing heavy (the CLI answers `--help` without torch); DeepSpeed's environment
is prepared where DeepSpeed is imported (parallel/ds_io.import_deepspeed)."""

__version__ = "0.1.0"
