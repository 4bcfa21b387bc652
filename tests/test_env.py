"""Process environment helpers: idle CPU priority for work beside the training stages, malloc settings."""

import os
import threading

import pytest

from vlsi_ray.env import MALLOC_ENV, at_idle_priority
from vlsi_ray.runners.ray.driver import ray_env

linux_only = pytest.mark.skipif(not hasattr(os, "SCHED_IDLE"), reason="SCHED_IDLE is Linux-only")


@linux_only
def test_at_idle_priority_runs_in_an_idle_thread_and_leaves_the_caller_as_it_was():
    before = os.sched_getscheduler(0)

    def probe():
        return os.sched_getscheduler(0), threading.current_thread().name

    policy, thread = at_idle_priority(probe)
    assert policy == os.SCHED_IDLE
    assert thread == "idle-priority" != threading.current_thread().name
    assert os.sched_getscheduler(0) == before != os.SCHED_IDLE


def test_at_idle_priority_returns_the_value_and_raises_the_error():
    assert at_idle_priority(lambda: [1, 2]) == [1, 2]

    def fail():
        raise KeyError("row 7")

    with pytest.raises(KeyError, match="row 7"):
        at_idle_priority(fail)


def test_workers_get_the_malloc_settings_unless_the_user_chose_their_own(monkeypatch):
    for key in [k for k in os.environ if k.startswith("MALLOC_")]:
        monkeypatch.delenv(key)
    assert {k: ray_env(tune_malloc=True)[k] for k in MALLOC_ENV} == {
        "MALLOC_MMAP_THRESHOLD_": "33554432",
        "MALLOC_TRIM_THRESHOLD_": "1073741824",
        "MALLOC_TOP_PAD_": "67108864",
    }
    assert not any(k.startswith("MALLOC_") for k in ray_env(tune_malloc=False))
    monkeypatch.setenv("MALLOC_ARENA_MAX", "2")  # the user's allocator settings stand: none of ours is added
    assert not any(k.startswith("MALLOC_") for k in ray_env(tune_malloc=True))
