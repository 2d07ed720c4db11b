from unidad_dist.cli import entry

entry()
