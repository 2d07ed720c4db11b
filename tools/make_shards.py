"""Shard writer: the same as ``unidad-dist make-shards`` (see unidad_dist/data/make_shards.py)."""
import sys

from unidad_dist.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["make-shards", *sys.argv[1:]]))
