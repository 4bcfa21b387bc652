"""Process environment: offline Hugging Face and wandb, DeepSpeed on CPU without CUDA, malloc, idle CPU priority."""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")

#: Variables :func:`set_offline_defaults` chose for this process (not the user): each process decides
#: those for itself, so Ray runners do not forward them (a GPU-less head must not say cpu to GPU workers).
DEFAULTED: set[str] = set()


#: glibc malloc settings for training processes: keep freed memory for reuse instead of returning it
#: to the OS. With glibc's defaults a CPU training step's activations are freed by munmap/trim and
#: page-faulted in again at the next step; with these they are reused. Allocations of 32 MiB and more
#: are still mmapped and returned; a process keeps at most 1 GiB of free heap. glibc reads them at
#: process start.
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(32 << 20), "MALLOC_TRIM_THRESHOLD_": str(1 << 30), "MALLOC_TOP_PAD_": str(64 << 20)}


def malloc_env() -> dict[str, str]:
    """:data:`MALLOC_ENV`, or nothing when the user set any ``MALLOC_*`` variable (their settings stand)."""
    return {} if any(k.startswith("MALLOC_") for k in os.environ) else dict(MALLOC_ENV)


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


def ray_job_working_dir() -> Path | None:
    """The temporary copy of ``ray job submit --working-dir`` this process runs in (its cwd) when it is
    a Ray job's entrypoint with a working directory, else None (Ray's job supervisor passes the job's
    runtime env in ``RAY_JOB_CONFIG_JSON_ENV_VAR``)."""
    raw = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")
    if not raw:
        return None
    try:
        runtime_env = json.loads(raw).get("runtime_env") or {}
    except (json.JSONDecodeError, AttributeError):
        return None
    return Path.cwd() if runtime_env.get("working_dir") else None


def _has_cuda_device() -> bool:
    # Cheap check that does not import torch: NVIDIA's driver exposes /dev/nvidia0 when a GPU is present.
    return os.path.exists("/dev/nvidia0")


def at_idle_priority(fn: Callable[[], T]) -> T:
    """``fn()`` run in a thread of Linux's lowest CPU scheduling class (``SCHED_IDLE``); its result.

    Such a thread only gets CPU time that no other thread of the machine wants, so work that is not
    on the critical path (the Ray runner's test passes) never slows a training process sharing its
    cores. The class is set on a throw-away thread because an unprivileged process cannot leave it;
    elsewhere than Linux ``fn`` runs at normal priority. With one torch thread (a 1-CPU Ray task)
    all of ``fn``'s compute runs in that thread.
    """
    outcome: dict = {}

    def target() -> None:
        try:
            os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
        except (AttributeError, OSError):  # not Linux, or a kernel without SCHED_IDLE
            pass
        try:
            outcome["value"] = fn()
        except BaseException as err:  # re-raised in the caller's thread
            outcome["error"] = err

    thread = threading.Thread(target=target, name="idle-priority", daemon=True)
    thread.start()
    thread.join()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]
