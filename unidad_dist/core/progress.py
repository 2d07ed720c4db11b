"""A progress bar that is live on a terminal and quiet in a log file."""
from __future__ import annotations


def progress_bar(total: int, desc: str, initial: int = 0, leave: bool = True):
    """A live bar on a terminal; in a log file (SLURM, CI) one line every 30 s."""
    import sys

    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc=desc, leave=leave, dynamic_ncols=True,
                mininterval=0.1 if sys.stderr.isatty() else 30.0)
