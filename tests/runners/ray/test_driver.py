"""The Ray runner against the in-process reference: equal step-2 losses through a killed teacher and a killed
Train worker, and resume after a failure."""

from __future__ import annotations

import json
from pathlib import Path

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


def test_ray_step2_equals_in_process_through_a_killed_teacher_and_a_killed_worker(local_ray, shared_data, local_reference):
    """One student worker, fixed seeds, exact signal: the same losses and matched layers as in-process (1e-6),
    although the teacher replica kills itself at its 3rd request (Ray restarts it; that request and the ones
    in flight are retried on the new process) and the Train worker kills itself after step 5 (Ray Train
    restarts the group from the step-4 checkpoint, which re-reads the same rows)."""
    cfg = load_config(
        None,
        interact_only(
            shared_data,
            "faults",
            "teacher_pool.kill_at_request=3",
            "train.fail_at_step=5",
            "train.max_failures=1",
            "train.log_ids=true",
        ),
    )
    report = run_ray(cfg)
    logged = list(read_metrics(cfg.run_dir / "metrics.jsonl", "interact"))
    assert [r["step"] for r in logged] == [1, 2, 3, 4, 5, 5, 6, 7, 8]  # step 5 ran twice: before the kill and after
    ray_records = interact_records(cfg)
    assert len(ray_records) == len(local_reference) == INTERACT_STEPS
    for ours, ref in zip(ray_records, local_reference):
        assert ours["matched"] == ref["matched"], ours["step"]
        assert abs(ours["loss"] - ref["loss"]) <= 1e-6 * max(1.0, abs(ref["loss"])), ours["step"]
        assert ours["teacher_wait_s"] >= 0 and ours["signal_bytes"] > 0 and "signal_bytes" not in ref

    # Steps 1-2 were answered by the first teacher process; from request 3 on, by the one Ray started after the kill.
    pids = [r["teacher_pids"] for r in logged]
    (first,) = pids[0]
    assert pids[1] == [first] and all(p and first not in p for p in pids[2:]), pids
    assert len({p for step in pids[2:] for p in step}) == 1  # one restart, never killed again

    # The audit: 5 batches before the kill, then steps 5-8 again from the checkpoint; the re-run step 5 read
    # the same rows, and the 8 batches of the trajectory hold 64 distinct rows.
    lines = [
        json.loads(line) for line in (cfg.run_dir / "interact" / "consumed_ids.interact.rank0.jsonl").read_text().splitlines()
    ]
    assert len(lines) == 5 + 4 and lines[4] == lines[5]
    trajectory = [i for line in lines[:4] + lines[5:] for i in line]
    assert len(trajectory) == INTERACT_STEPS * 8 == len(set(trajectory))  # each row once (one epoch holds 296)
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


def test_sft_workers_run_step3_in_a_train_run_of_its_own_after_the_teacher(local_ray, shared_data):
    """train.sft_workers=2: step 2 trains on one worker with the teacher pool, then step 3 in a second Train
    run (``student_sft``) on two workers, each reading its share of the rows, from step 2's student."""
    cfg = load_config(
        None,
        make_tiny_overrides(shared_data, "sft-workers", {"interact": 2, "sft": 2})
        + [
            "steps=[interact,sft]",
            "baseline_sft=false",
            "eval_models=[]",
            "train.use_gpu=false",
            "train.sft_workers=2",
            "train.log_ids=true",
            "stages.sft.batch_size=2",
            "stages.sft.grad_accum=1",
        ],
    )
    run_ray(cfg)
    runs = sorted(p.name for p in (cfg.run_dir / "ray_train").iterdir() if not p.name.endswith("-init"))
    assert runs == ["student", "student_sft"]
    layout = cfg.run_dir
    assert sorted(p.name for p in (layout / "interact").glob("consumed_ids.*")) == ["consumed_ids.interact.rank0.jsonl"]
    sft_ids = sorted((layout / "sft").glob("consumed_ids.*"))
    assert [p.name for p in sft_ids] == ["consumed_ids.sft.rank0.jsonl", "consumed_ids.sft.rank1.jsonl"]
    shares = [{i for line in p.read_text().splitlines() for i in json.loads(line)} for p in sft_ids]
    assert [len(s) for s in shares] == [2 * 2, 2 * 2] and not shares[0] & shares[1]  # 2 steps × 2 rows each, disjoint
    assert json.loads((layout / "sft" / "stage.json").read_text())["steps"] == 2
    # the teacher pool's last act (step 2's follow-up) came before the SFT run's first worker started
    placement = layout / "interact" / "teacher_placement.json"
    assert placement.stat().st_mtime <= min(p.stat().st_mtime for p in (layout / "sft").glob("*placement*"))
