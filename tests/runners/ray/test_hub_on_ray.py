"""Released checkpoints on Ray: bfloat16 Qwen2-VL and LLaVA-OneVision pairs in the Hub's layout through the
Ray runner (teacher actors, Ray Train student, evaluation tasks) and the teacher cache (Ray Data)."""

from __future__ import annotations

import json
import math
import shutil

import pytest

from vlsi_ray.config import load_config
from vlsi_ray.metrics import read_metrics
from vlsi_ray.runners.local import run_local
from vlsi_ray.runners.ray.driver import run_ray
from vlsi_ray.teacher.cache import build_cache

from hub_world import HUB_STEPS

pytestmark = pytest.mark.integration
STAGES = ("verbalize/teacher", "verbalize/student", "interact", "baseline_sft", "sft")


def stage_losses(run_dir, stage: str) -> list[float]:
    by_step = {r["step"]: r["loss"] for r in read_metrics(run_dir / "metrics.jsonl", stage)}
    return [by_step[s] for s in sorted(by_step)]


@pytest.mark.parametrize("family", ["qwen2_vl", "llava_onevision"])
def test_bfloat16_pair_runs_every_stage_on_ray_and_its_teacher_cache_gives_the_same_step2(local_ray, hub_worlds, family):
    """Steps 1-3, the SFT-only baseline and every test pass on Ray from the released-layout pair; then the
    run's teacher cache (built with Ray Data from the same bfloat16 teacher) replays step 2 with the losses
    the live teacher actors gave."""
    world = hub_worlds(family)
    overrides = world.overrides(f"ray-bf16-{family}", "train.use_gpu=false", "signal.storage=float32")
    cfg = load_config(None, overrides)
    report = run_ray(cfg)
    for stage in STAGES:
        losses = stage_losses(cfg.run_dir, stage)
        settings = "sft" if stage == "baseline_sft" else stage.split("/")[0]
        assert len(losses) == HUB_STEPS[settings] and all(math.isfinite(x) for x in losses), stage
    for rel in ("interact/student", "baseline_sft/student", "sft/student"):
        assert json.loads((cfg.run_dir / rel / "config.json").read_text())["dtype"] == "bfloat16", rel
    assert set(report["accuracy"]) == {"teacher", "student_base", "student_sft_only", "vlsi_without_sft", "vlsi"}

    live = stage_losses(cfg.run_dir, "interact")
    manifest = build_cache(cfg)
    assert manifest["rows"] == 64 and manifest["spec"]["teacher.dtype"] == "auto"
    shutil.rmtree(cfg.run_dir / "interact")
    replay = load_config(None, overrides + ["teacher.source=cache", "steps=[interact]", "eval_models=[]", "runner=local"])
    run_local(replay)
    cached = stage_losses(cfg.run_dir, "interact")
    assert len(cached) == len(live) == HUB_STEPS["interact"]
    for ours, ref in zip(cached, live):
        assert abs(ours - ref) <= 1e-5 * max(1.0, abs(ref)), (cached, live)
