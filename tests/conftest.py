"""Shared test set-up: the offline environment (no hub, no wandb upload) before anything imports transformers."""

from __future__ import annotations

import os
import time

from vlsi_ray.env import set_offline_defaults

set_offline_defaults()

from hypothesis import settings  # noqa: E402

# Property tests draw the same examples on every run (a CI failure reproduces locally); derandomize=False
# locally with HYPOTHESIS_PROFILE=explore to search new examples.
settings.register_profile("ci", derandomize=True, deadline=None)
settings.register_profile("explore", derandomize=False, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


from pathlib import Path  # noqa: E402
from types import SimpleNamespace  # noqa: E402

import pytest  # noqa: E402
import ray  # noqa: E402
import torch  # noqa: E402
from ray.data import DataContext  # noqa: E402

from vlsi_ray.eval.fixtures import write_fixture_sets  # noqa: E402
from vlsi_ray.runners.ray.driver import local_runtime_env  # noqa: E402

from hub_world import make_hub_world  # noqa: E402
from tiny_config import make_tiny_overrides  # noqa: E402
from tiny_run import make_e2e_run, make_tiny_run  # noqa: E402


@pytest.fixture(scope="session")
def tiny_overrides():
    """:func:`make_tiny_overrides`, as a fixture."""
    return make_tiny_overrides


@pytest.fixture(scope="module")
def one_thread():
    """Tiny matmuls: one intra-op thread is far faster than two when the 2 cores are shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> SimpleNamespace:
    """``run`` (a finished tiny run: teacher, SFT student, both verbalizers; see tiny_run.py) and ``data`` (its shards)."""
    tmp = tmp_path_factory.mktemp("tiny_run")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run = make_tiny_run(tmp)
    finally:
        torch.set_num_threads(threads)
    return SimpleNamespace(run=run, data=tmp / "data")


@pytest.fixture(scope="session")
def e2e_run(tmp_path_factory) -> SimpleNamespace:
    """A trained run: every step and the SFT-only baseline on the default matching, with bad rows planted
    (:func:`tiny_run.make_e2e_run`: ``cfg``, ``report``, ``seconds``); end-to-end and export tests read it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return make_e2e_run(tmp_path_factory.mktemp("e2e"))
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def fixture_sets(tmp_path_factory):
    """Tiny MCQ / POPE files in VLMEvalKit's formats (10 MCQ rows, 4 images × 3 POPE questions)."""
    return write_fixture_sets(Path(tmp_path_factory.mktemp("eval_sets")))


@pytest.fixture(scope="session")
def hub_worlds(tmp_path_factory):
    """``hub_worlds(family)``: a bfloat16 teacher/student pair of ``family`` in the Hub's layout, with
    small shards (:func:`hub_world.make_hub_world`), built once per session."""
    worlds: dict = {}

    def world(family: str):
        if family not in worlds:
            worlds[family] = make_hub_world(tmp_path_factory.mktemp(f"hub-{family}"), family)
        return worlds[family]

    return world


#: The local Ray the integration tests share: room for a teacher actor, a Train worker and Ray Data tasks at
#: once (4 logical CPUs), and 2 fake GPUs (placement tests ask for ``num_gpus``; CUDA stays unavailable, so the
#: actors still compute on CPU).
LOCAL_RAY_RESOURCES = {"CPU": 4.0, "GPU": 2.0}


@pytest.fixture(scope="session")
def _ray_session():
    """Stops the shared local Ray (if one runs) when the session ends."""
    yield
    if ray.is_initialized():
        ray.shutdown()


@pytest.fixture(scope="module", autouse=True)
def _no_idle_ray(request):
    """Before a module none of whose tests uses :func:`local_ray`: stop the shared Ray, so that its idle
    processes do not share the 2 cores with CPU-bound tests (the next module that uses it starts it again)."""
    if ray.is_initialized() and not any(
        "local_ray" in item.fixturenames for item in request.session.items if item.module is request.module
    ):
        ray.shutdown()


@pytest.fixture(scope="module")
def local_ray(_ray_session):
    """The shared local Ray (:data:`LOCAL_RAY_RESOURCES`), started by the first module that asks for it and kept
    for the next ones: a Ray start and Ray Data's first use cost ~20 s on 2 cores. A module that needs a Ray of
    its own (a multi-node cluster, a head with a dashboard) shuts this one down first; the next module to ask
    for it starts it again."""
    if ray.is_initialized() and not _is_shared_local_ray():
        ray.shutdown()  # another module's Ray
    if not ray.is_initialized():  # as the runner starts a local Ray for tiny.yaml: no dashboard, tuned malloc
        ray.init(
            address="local",
            num_cpus=int(LOCAL_RAY_RESOURCES["CPU"]),
            num_gpus=int(LOCAL_RAY_RESOURCES["GPU"]),
            include_dashboard=False,
            runtime_env=local_runtime_env(tune_malloc=True, include_dashboard=False),
        )
        DataContext.get_current().enable_progress_bars = False
    yield ray
    _release_or_stop()


def _is_shared_local_ray() -> bool:
    """Whether the Ray this process is connected to is :func:`local_ray`'s (one node, its resources)."""
    resources = ray.cluster_resources()
    return {k: resources.get(k) for k in LOCAL_RAY_RESOURCES} == LOCAL_RAY_RESOURCES and len(ray.nodes()) == 1


def _release_or_stop(wait_s: float = 20.0) -> None:
    """After a module: the shared Ray is kept only once every CPU and GPU is free again (the module's actors
    and tasks are gone); else it is stopped, so that nothing a module left running holds the next one up."""
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        free = ray.available_resources()
        if all(free.get(k, 0.0) >= v for k, v in LOCAL_RAY_RESOURCES.items()):
            return
        time.sleep(0.5)
    ray.shutdown()
