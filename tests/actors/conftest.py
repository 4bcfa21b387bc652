"""Ray for the actor tests: one local Ray per test module (4 logical CPUs, 2 fake GPUs)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def local_ray():
    """A local Ray with room for a teacher actor, a Train worker and Ray Data tasks at once.

    Two fake GPUs let placement tests ask for ``num_gpus``; CUDA stays unavailable, so the actors
    still compute on CPU.
    """
    import ray
    from ray.data import DataContext

    from vlsi_ray.ray_runner import local_runtime_env

    # As the runner starts a local Ray for tiny.yaml: no dashboard (~15% of a core), workers with tuned malloc.
    ray.init(address="local", num_cpus=4, num_gpus=2, include_dashboard=False,
             runtime_env=local_runtime_env(tune_malloc=True, include_dashboard=False))
    DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()
