"""Compact string storage for annotation tables.

Python lists of dicts are the classic DataLoader memory leak: every worker touches the reference counts of the
objects it reads, the kernel copies those pages, and each worker ends up holding its own copy of the annotation
list. A :class:`StringTable` keeps all strings in one UTF-8 byte array plus an offset array, i.e. two numpy
objects, whatever the number of strings, so forked workers share the pages for good.
"""

from __future__ import annotations

from array import array
from collections.abc import Iterable

import numpy as np


class StringTable:
    """Immutable sequence of strings stored as ``data`` (uint8 UTF-8 bytes) and ``offsets`` (int64, n+1)."""

    __slots__ = ("data", "offsets")

    def __init__(self, data: np.ndarray, offsets: np.ndarray) -> None:
        self.data = data
        self.offsets = offsets

    @classmethod
    def from_strings(cls, strings: Iterable[str]) -> StringTable:
        builder = StringTableBuilder()
        for s in strings:
            builder.add(s)
        return builder.build()

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> str:
        start, end = self.offsets[i], self.offsets[i + 1]
        return self.data[start:end].tobytes().decode("utf-8")

    def __iter__(self):
        for i in range(len(self)):
            yield self[i]

    @property
    def nbytes(self) -> int:
        return int(self.data.nbytes + self.offsets.nbytes)


class StringTableBuilder:
    """Appends strings into growing byte/offset buffers (no per-string Python object is kept)."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self._ends = array("q")

    def __len__(self) -> int:
        return len(self._ends)

    def add(self, s: str) -> int:
        """Append ``s`` and return its position."""
        self._buf += s.encode("utf-8")
        self._ends.append(len(self._buf))
        return len(self._ends) - 1

    def build(self) -> StringTable:
        # Offsets get a leading 0 so string i spans offsets[i]:offsets[i + 1].
        offsets = np.zeros(len(self._ends) + 1, dtype=np.int64)
        offsets[1:] = np.frombuffer(self._ends, dtype=np.int64) if len(self._ends) else offsets[1:]
        data = np.frombuffer(bytes(self._buf), dtype=np.uint8)
        self._buf, self._ends = bytearray(), array("q")
        return StringTable(data, offsets)
