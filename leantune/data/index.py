"""Indexes whose memory does not grow with the dataset: a shuffle computed per index, integers on disk.

Streaming (``data.streaming: true``) must hold memory flat in the number of records. Two things would
otherwise grow with it: the shuffled order of an epoch (8 bytes per example as an int64 array) and the
per-record index (byte offset and line of every JSON Lines record, the row key of every kept example).

- :class:`SeededPermutation` is a pseudo-random permutation of ``range(n)`` evaluated one index at a time
  -- a balanced Feistel network over the smallest even-width bit domain ``>= n``, with a keyed BLAKE2b round
  function, restricted to ``range(n)`` by cycle-walking (Black & Rogaway, "Ciphers with arbitrary finite
  domains", 2002). Six rounds; Luby-Rackoff needs four for a pseudo-random permutation. Memory O(1);
  ``perm[i]`` costs about 6-24 hashes (the domain is < 4n, so a walk takes < 4 steps on average).
- :class:`DiskInts` is an append-only int64 sequence in an unlinked temporary file, read back with
  ``os.pread`` (8 bytes per item on disk, a fixed 512 KiB write buffer in memory). ``pread`` instead of a
  memory map so that pages read during training do not accumulate in the process's RSS.
"""

from __future__ import annotations

import hashlib
import os
import sys
import tempfile
from array import array
from collections.abc import Iterator, Sequence


class SeededPermutation(Sequence):
    """``perm[i]`` for ``i in range(n)`` is a permutation of ``range(n)`` fixed by ``key`` (any string).

    >>> p = SeededPermutation(10, "seed:0:epoch:1")
    >>> sorted(p) == list(range(10))
    True
    >>> list(p) == list(SeededPermutation(10, "seed:0:epoch:1"))
    True
    """

    ROUNDS = 6

    def __init__(self, n: int, key: str):
        if n < 0:
            raise ValueError(f"SeededPermutation: n must be >= 0, got {n}")
        self.n, self.key = n, key
        bits = max(2, (n - 1).bit_length())
        bits += bits % 2  # balanced halves
        self._half = bits // 2
        self._mask = (1 << self._half) - 1
        # One 16-byte BLAKE2b key per round, derived from the user's key: the round functions are independent.
        self._round_keys = [hashlib.blake2b(f"{key}|round {r}".encode(), digest_size=16).digest()
                            for r in range(self.ROUNDS)]

    def __len__(self) -> int:
        return self.n

    def _encrypt(self, x: int) -> int:
        left, right = x >> self._half, x & self._mask
        for round_key in self._round_keys:
            f = hashlib.blake2b(right.to_bytes(8, "little"), key=round_key, digest_size=8).digest()
            left, right = right, left ^ (int.from_bytes(f, "little") & self._mask)
        return (left << self._half) | right

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(self.n))]
        if not -self.n <= i < self.n:
            raise IndexError(f"permutation index {i} out of range ({self.n})")
        x = self._encrypt(i % self.n)
        while x >= self.n:  # cycle-walking: stays on i's cycle of the 2^bits-domain permutation
            x = self._encrypt(x)
        return x

    def __iter__(self) -> Iterator[int]:
        return (self[i] for i in range(self.n))


class DiskInts(Sequence):
    """An append-only sequence of int64 kept in an unlinked temporary file (``$TMPDIR`` or ``dir``).

    Memory is the write buffer (``buffer`` items), whatever the length. The file disappears when the
    object is collected or the process exits. Not picklable (it owns an open file).

    >>> d = DiskInts(buffer=2)
    >>> for v in (5, -1, 7): d.append(v)
    >>> len(d), d[0], d[1], d[-1], d[0:3]
    (3, 5, -1, 7, [5, -1, 7])
    """

    def __init__(self, dir: str | None = None, buffer: int = 65536):
        self._file = tempfile.TemporaryFile(prefix="leantune-index-", dir=dir)
        self._fd = self._file.fileno()
        self._buffer, self._capacity = array("q"), buffer
        self._on_disk = 0

    def append(self, value: int) -> None:
        self._buffer.append(value)
        if len(self._buffer) >= self._capacity:
            self.flush()

    def flush(self) -> None:
        if self._buffer:
            os.pwrite(self._fd, self._buffer.tobytes(), self._on_disk * 8)
            self._on_disk += len(self._buffer)
            self._buffer = array("q")

    def __len__(self) -> int:
        return self._on_disk + len(self._buffer)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"index {i} out of range ({n} items)")
        i %= n
        if i >= self._on_disk:
            return self._buffer[i - self._on_disk]
        return int.from_bytes(os.pread(self._fd, 8, i * 8), sys.byteorder, signed=True)  # array("q") is native-endian

    def close(self) -> None:
        self._file.close()

    def __getstate__(self):
        raise TypeError("DiskInts holds an open temporary file and cannot be pickled; build it in each process")
