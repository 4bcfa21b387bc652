"""The Ray runner against the in-process reference: equal step-2 losses, resume, a killed teacher, bad rows."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import psutil
import pytest
import ray.train

from vlsi_ray.config import load_config
from vlsi_ray.metrics import read_metrics
from vlsi_ray.runners.local import run_local
from vlsi_ray.runners.ray.driver import run_ray

from tiny_config import make_tiny_overrides

pytestmark = pytest.mark.integration

INTERACT_STEPS = 8
#: Exact signal (k >= vocab keeps every token; float32 on the wire) and the paper's sampled matching.
EXACT = ["signal.topk=100000", "signal.storage=float32", "matching.strategy=multinomial"]


def interact_only(tmp: Path, name: str, *extra: str) -> list[str]:
    """Step 2 alone on untrained tiny models (step 1 skipped: logit-lens verbalizers), no SFT baseline."""
    return make_tiny_overrides(tmp, name, {"interact": INTERACT_STEPS}) + [
        "steps=[interact]",
        "baseline_sft=false",
        "train.use_gpu=false",
        "train.report_every=2",
        "train.checkpoint_every=4",
        *EXACT,
        *extra,
    ]


def interact_records(cfg) -> list[dict]:
    by_step = {r["step"]: r for r in read_metrics(cfg.run_dir / "metrics.jsonl", "interact")}
    return [by_step[s] for s in sorted(by_step)]


@pytest.fixture(scope="module")
def shared_data(tmp_path_factory):
    return tmp_path_factory.mktemp("ray-runs")


@pytest.fixture(scope="module")
def local_reference(shared_data, one_thread):
    cfg = load_config(None, interact_only(shared_data, "local"))
    run_local(cfg)
    return interact_records(cfg)


def test_ray_step2_equals_in_process_through_a_worker_restart(local_ray, shared_data, local_reference):
    """One student worker, fixed seeds, exact signal: the same losses and matched layers as in-process,
    even though the worker dies after step 5 and Ray Train (FailureConfig) restarts it from step 4."""
    cfg = load_config(None, interact_only(shared_data, "ray", "train.fail_at_step=5", "train.max_failures=1"))
    report = run_ray(cfg)
    ray_records = interact_records(cfg)
    logged_steps = [r["step"] for r in read_metrics(cfg.run_dir / "metrics.jsonl", "interact")]
    assert logged_steps == [1, 2, 3, 4, 5, 5, 6, 7, 8]  # step 5 ran twice: before the failure and after the restart
    assert len(ray_records) == len(local_reference) == INTERACT_STEPS
    for ours, ref in zip(ray_records, local_reference):
        assert ours["matched"] == ref["matched"]
        assert abs(ours["loss"] - ref["loss"]) <= 1e-6 * max(1.0, abs(ref["loss"]))
        assert ours["teacher_wait_s"] >= 0 and ours["signal_bytes"] > 0 and "signal_bytes" not in ref
    assert set(report["accuracy"]) == {"teacher", "student_base", "vlsi_without_sft"}
    assert (cfg.run_dir / "interact" / "student" / "config.json").is_file()


def test_resume_after_a_failure_continues_the_same_trajectory(local_ray, shared_data, local_reference):
    """Steps 2 and 3 in one Train run; stop after step 4 of step 2 (a checkpoint), re-run the same
    command: steps 5..8 equal the uninterrupted run, then step 3 starts from its own beginning (the
    run's latest checkpoint belongs to step 2) and runs once."""
    name, chain = "resume", ["steps=[interact,sft]", "stages.sft.max_steps=3"]

    with pytest.raises(ray.train.TrainingFailedError):  # the injected failure, with no restart allowed
        run_ray(load_config(None, interact_only(shared_data, name, "train.fail_at_step=5", "train.max_failures=0", *chain)))
    cfg = load_config(None, interact_only(shared_data, name, *chain))
    first = interact_records(cfg)
    assert [r["step"] for r in first] == [1, 2, 3, 4, 5]
    assert not (cfg.run_dir / "interact" / "stage.json").exists()
    report = run_ray(cfg)
    resumed = interact_records(cfg)
    assert [r["step"] for r in resumed] == list(range(1, INTERACT_STEPS + 1))
    for ours, ref in zip(resumed[4:], local_reference[4:]):
        assert ours["matched"] == ref["matched"]
        assert abs(ours["loss"] - ref["loss"]) <= 1e-6 * max(1.0, abs(ref["loss"]))
    assert [r["step"] for r in read_metrics(cfg.run_dir / "metrics.jsonl", "sft")] == [1, 2, 3]
    assert json.loads((cfg.run_dir / "sft" / "stage.json").read_text())["steps"] == 3
    assert sorted(p.name for p in (cfg.run_dir / "ray_train").iterdir() if not p.name.endswith("-init")) == ["student"]
    assert set(report["accuracy"]) == {"teacher", "student_base", "vlsi_without_sft", "vlsi"}


def test_killed_teacher_is_restarted_and_every_row_is_consumed_once(local_ray, shared_data):
    cfg = load_config(None, interact_only(shared_data, "fault", "train.log_ids=true", "train.checkpoint_every=0"))
    metrics = cfg.run_dir / "metrics.jsonl"
    killed = {}

    def kill_teacher_mid_step2():
        deadline = time.time() + 600
        while time.time() < deadline:
            if sum(1 for _ in read_metrics(metrics, "interact")) >= 2:
                # This test's Ray runs below this process (not another one on the machine); a Ray
                # worker is titled "ray::<class>" or "ray::<class>.<method>" while it runs one.
                for proc in psutil.Process().children(recursive=True):
                    try:
                        title = (proc.cmdline() or [""])[0]  # Ray pads the title with empty arguments
                    except psutil.Error:  # ended meanwhile
                        continue
                    if title == "ray::TeacherWorker" or title.startswith("ray::TeacherWorker."):
                        os.kill(proc.pid, signal.SIGKILL)
                        killed["pid"] = proc.pid
                return
            time.sleep(0.2)

    killer = threading.Thread(target=kill_teacher_mid_step2, daemon=True)
    killer.start()
    run_ray(cfg)
    killer.join(timeout=5)
    assert "pid" in killed, "the teacher was never killed; the test did not exercise the fault"
    records = interact_records(cfg)
    assert [r["step"] for r in records] == list(range(1, INTERACT_STEPS + 1))
    consumed = [
        i
        for line in (cfg.run_dir / "interact" / "consumed_ids.interact.rank0.jsonl").read_text().splitlines()
        for i in json.loads(line)
    ]
    assert len(consumed) == INTERACT_STEPS * 8 == len(set(consumed))  # each row once (one epoch holds 296)
