"""unidad_dist: distributed Uni-DAD training (few-step distillation + few-shot domain adaptation)."""

__version__ = "0.1.0"
