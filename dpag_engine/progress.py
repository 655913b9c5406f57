"""One progress-bar policy for long work: redraw often on a terminal, every 10 s in a log file."""
from __future__ import annotations

import sys

from tqdm import tqdm


def progress_bar(iterable=None, **kwargs) -> tqdm:
    """tqdm that stays readable in CI and nohup logs (a line every 10 s instead of every update)."""
    kwargs.setdefault("mininterval", 0.1 if sys.stderr.isatty() else 10.0)
    kwargs.setdefault("dynamic_ncols", True)
    return tqdm(iterable, **kwargs)
