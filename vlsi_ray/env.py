"""Process environment defaults: offline Hugging Face, offline wandb, DeepSpeed on CPU without CUDA."""

from __future__ import annotations

import os

#: Variables :func:`set_offline_defaults` chose for this process (not the user): each process decides
#: those for itself, so Ray runners do not forward them (a GPU-less head must not say cpu to GPU workers).
DEFAULTED: set[str] = set()


def set_offline_defaults() -> None:
    """Set the offline defaults unless the user already chose otherwise (call before importing transformers)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("WANDB_SILENT", "true")  # no wandb banner and summary in every stage's log
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    if not os.environ.get("CUDA_VISIBLE_DEVICES") and not _has_cuda_device() and "DS_ACCELERATOR" not in os.environ:
        os.environ["DS_ACCELERATOR"] = "cpu"
        DEFAULTED.add("DS_ACCELERATOR")


def _has_cuda_device() -> bool:
    # Cheap check that does not import torch: NVIDIA's driver exposes /dev/nvidia0 when a GPU is present.
    return os.path.exists("/dev/nvidia0")
