"""Run logs that keep memory flat: fixed-size rows streamed to disk in chunks.

A robot run logs every servo command (125-500 a second) for as long as it runs; kept in Python
lists that grew ~5.4 MB a minute at 125 Hz. Here each log is a numpy structured dtype, rows go into
one preallocated chunk, and a full chunk is appended to a raw file (the dtype's bytes, nothing
else) and reused. Reading back maps the file (`np.memmap`), so a plot of an hour-long run pages the
data in instead of holding a second copy.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np


class StreamLog:
    """Rows of `dtype` appended by one thread; `rows()` gives all of them (a read-only map)."""

    def __init__(self, path: str | os.PathLike, dtype: np.dtype | list, chunk_rows: int = 2048):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.dtype = np.dtype(dtype)
        self._chunk = np.zeros(chunk_rows, self.dtype)
        self._filled = 0
        self.count = 0          # rows appended in all
        self.last = None        # the newest row (a copy), for live status
        self._file = open(self.path, "wb")

    def append(self, *fields) -> None:
        row = self._chunk[self._filled]
        for name, value in zip(self.dtype.names, fields):
            row[name] = value
        self.last = row.copy()
        self._filled += 1
        self.count += 1
        if self._filled == len(self._chunk):
            self.flush()

    def flush(self) -> None:
        if self._file.closed:
            return
        self._file.write(self._chunk[:self._filled].tobytes())
        self._file.flush()
        self._filled = 0

    def rows(self) -> np.ndarray:
        """Every row so far, in order: a read-only memory map of the file (empty when none)."""
        self.flush()
        if self.count == 0:
            return np.zeros(0, self.dtype)
        return np.memmap(self.path, dtype=self.dtype, mode="r", shape=(self.count,))

    def close(self, remove: bool = False) -> None:
        self.flush()
        self._file.close()
        if remove:
            self.path.unlink(missing_ok=True)

    def __len__(self) -> int:
        return self.count
