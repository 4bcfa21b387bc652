"""`ray job submit --working-dir . -- python jobs/distill.py ...` against a head this test starts."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import ray

from tiny_config import make_tiny_overrides

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).with_name("ray"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def head(tmp_path):
    """A Ray head on loopback with token auth off (Ray 2.60 turns it on by default), stopped afterwards."""
    if ray.is_initialized():
        ray.shutdown()
    # PATH as in an activated virtualenv, so the job's `python` is this environment's.
    env = dict(os.environ, RAY_AUTH_MODE="disabled", PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    dashboard = _free_port()
    subprocess.run(
        [
            RAY,
            "start",
            "--head",
            "--node-ip-address=127.0.0.1",
            f"--port={_free_port()}",
            "--num-cpus=4",
            "--include-dashboard=true",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dashboard}",
            # Free ports for the head's agents too: their fixed defaults (52365, ...) clash with any other Ray
            # on the machine, and the job agent then never comes up ("No available agent to submit job").
            f"--dashboard-agent-listen-port={_free_port()}",
            f"--dashboard-agent-grpc-port={_free_port()}",
            f"--runtime-env-agent-port={_free_port()}",
            f"--metrics-export-port={_free_port()}",
            f"--ray-client-server-port={_free_port()}",
            "--disable-usage-stats",
        ],
        env=env,
        check=True,
        capture_output=True,
        timeout=120,
    )
    try:
        yield f"http://127.0.0.1:{dashboard}", env
    finally:
        subprocess.run([RAY, "stop", "--force"], env=env, capture_output=True, timeout=120)


#: What Ray's job server answers while the head's job agent is still starting (it says to try again).
AGENT_STARTING = "No available agent to submit job"


def _submit(address: str, env: dict, overrides: list[str], timeout: int) -> subprocess.CompletedProcess:
    """``ray job submit --working-dir <project> -- python jobs/distill.py <overrides>``, retried for up to
    three minutes while the head's job agent is still starting (slower on a loaded machine)."""
    deadline = time.monotonic() + 180
    while True:
        done = subprocess.run(
            [
                RAY,
                "job",
                "submit",
                f"--address={address}",
                f"--working-dir={ROOT}",
                "--",
                "python",
                "jobs/distill.py",
                *overrides,
            ],
            env=env,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if AGENT_STARTING not in done.stdout + done.stderr or time.monotonic() > deadline:
            return done
        time.sleep(2)


def test_job_submit_runs_the_pipeline_and_writes_the_report(head, tmp_path):
    """As the README's local-cluster commands do: a head started from the project's environment, the job
    submitted with --working-dir. A relative output path is refused (it would land in Ray's temporary copy
    of the working directory) before any work; with absolute paths the report lands where they point."""
    address, env = head
    overrides = make_tiny_overrides(tmp_path, "job", {"interact": 4}) + [
        "steps=[interact]",
        "baseline_sft=false",
        "ray.logger=wandb",
    ]
    refused = _submit(address, env, [*overrides, "output_dir=runs-relative"], timeout=300)
    assert refused.returncode != 0
    assert (
        "output_dir=runs-relative is relative, and this Ray job runs in a temporary copy of its working directory"
        in refused.stdout + refused.stderr
    )
    assert "e.g. output_dir=$PWD/runs-relative" in refused.stdout + refused.stderr
    done = _submit(address, env, overrides, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "succeeded" in done.stdout
    assert "[ray] cluster at" in done.stdout  # the job joined the head instead of starting its own Ray
    report = json.loads((tmp_path / "runs" / "job" / "report.json").read_text())
    assert report["runner"] == "ray"
    assert set(report["accuracy"]) == {"teacher", "student_base", "vlsi_without_sft"}
    assert all(0.0 <= r["overall"] <= 1.0 and r["n"] == 100 for r in report["accuracy"].values())
    assert list((tmp_path / "runs" / "job" / "wandb").glob("offline-run-*"))  # rank 0 logged to wandb, offline
