"""How collated batches travel through the Ray object store: numpy arrays, never torch tensors.

numpy arrays are zero-copy in the object store, torch tensors are pickled; lists (row ids, tasks)
pass through unchanged.
"""

from __future__ import annotations

import numpy as np
import torch


def encode_batch(batch: dict) -> dict:
    """Collated batch -> the same keys with tensors as numpy arrays (``[B, T]`` ids stay int64)."""
    return {k: v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def decode_batch(batch: dict) -> dict:
    """Inverse of :func:`encode_batch` (object-store arrays are read-only, so they are copied)."""
    out = {}
    for k, v in batch.items():
        if isinstance(v, np.ndarray):
            out[k] = torch.from_numpy(v if v.flags.writeable else v.copy())
        else:
            out[k] = v
    return out


def batch_key(batch: dict) -> tuple:
    """Identity of a batch: its row ids in order (teacher and student see the same rows)."""
    if "ids" not in batch:
        raise KeyError("a batch sent to the teacher needs 'ids' (row ids); collate it with ChatCollator.")
    return tuple(str(i) for i in batch["ids"])
