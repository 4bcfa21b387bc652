"""The seeded order of a stage's rows: one keyed hash per (seed, epoch, row id), optionally length-grouped.

The in-process loop draws batches from :class:`BatchOrder`; the Ray Data pipeline
(:mod:`vlsi_ray.data.ray_dataset`) sorts by the very same keys in its workers. Nothing here imports
torch: Ray Data's worker processes import this module to order rows.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np


def order_keys(ids: Iterable, seed: int, epoch: int) -> np.ndarray:
    """Sort keys ``[n]`` int64 in ``[0, 2**63)`` of row ids for one epoch: a keyed hash of ``(seed, epoch, id)``.

    Sorting rows by these keys is the epoch's shuffle. It depends only on the ids, so a Ray Data
    pipeline (which sees rows in any block order) and the in-process loop agree on it.
    """
    salt = f"vlsi-ray/{seed}/{epoch}/".encode()
    return np.fromiter(
        (int.from_bytes(hashlib.blake2b(salt + str(i).encode(), digest_size=8).digest(), "big") >> 1 for i in ids),
        dtype=np.int64,
    )


def epoch_sort_keys(
    ids: Sequence, seed: int, epoch: int, lengths: Sequence[int] | None = None, group_rows: int = 0, rows: int | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """What orders the rows ``ids`` in epoch ``epoch``: ``(group, -length, key)``, three int64 arrays ``[n]``.

    ``key``: :func:`order_keys`. Without ``lengths`` (token counts, one per id) or ``group_rows`` the group
    and length are zero: the epoch is in key order. Otherwise the stage's ``rows`` (default: ``len(ids)``)
    fall in ``rows // group_rows`` equal key ranges (at least one), each of about ``group_rows`` shuffled
    rows, ordered longest first: consecutive rows have similar lengths. A row's three keys depend only on
    its id, its length and ``rows``, so a Ray Data worker computes them from the row alone.
    """
    keys = order_keys(ids, seed, epoch)
    zeros = np.zeros(len(keys), dtype=np.int64)
    if lengths is None or group_rows <= 0:
        return zeros, zeros, keys
    count = max(1, (len(keys) if rows is None else rows) // group_rows)
    groups = keys // np.int64(-(-(2**63) // count)) if count > 1 else zeros
    return groups, -np.asarray(lengths, dtype=np.int64), keys


def epoch_order(ids: Sequence, seed: int, epoch: int, lengths: Sequence[int] | None = None, group_rows: int = 0) -> np.ndarray:
    """The rows of one epoch in training order, as indices ``[n]`` into ``ids`` (by :func:`epoch_sort_keys`)."""
    groups, negative_lengths, keys = epoch_sort_keys(ids, seed, epoch, lengths, group_rows)
    return np.lexsort((keys, negative_lengths, groups))


def padding_fraction(batches: Iterable[Sequence[int]]) -> float:
    """Share of a padded batch's positions that are padding, over ``batches`` of row lengths (each batch is
    padded to its longest row)."""
    padded = real = 0
    for lengths in batches:
        padded += max(lengths) * len(lengths)
        real += sum(lengths)
    return 1 - real / padded if padded else 0.0


@dataclass
class BatchOrder:
    """Seeded, epoch-wise shuffled batches of row indices; ``position`` counts batches handed out.

    Epoch ``e`` orders the rows by :func:`epoch_order` (length-grouped when given ``lengths`` and
    ``group_rows``) and cuts them into full batches (the remainder is dropped).
    """

    ids: Sequence
    batch_size: int
    seed: int
    position: int = 0
    lengths: Sequence[int] | None = None
    group_rows: int = 0

    @property
    def batches_per_epoch(self) -> int:
        """Full batches per epoch."""
        return max(1, len(self.ids) // self.batch_size)

    def __iter__(self) -> Iterator[list[int]]:
        cached_epoch, order = -1, None
        while True:
            epoch, index = divmod(self.position, self.batches_per_epoch)
            if epoch != cached_epoch:
                order, cached_epoch = epoch_order(self.ids, self.seed, epoch, self.lengths, self.group_rows), epoch
            start = index * self.batch_size
            self.position += 1
            yield order[start : start + self.batch_size].tolist()
