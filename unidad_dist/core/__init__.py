"""Layer 0: what every other layer uses — keyed random draws, checksums and atomic file writes, image
conversion and grids, a progress bar, and the recipe schema (typed sections, YAML, overrides). Nothing
here imports any other part of the package except ``errors`` and ``device``."""
