"""The offline teacher cache: built by Ray Data + teacher actors, read by step 2 in both runners.

Step 2 fed from the cache equals step 2 with the live teacher (same seed, same k, float32 storage):
same losses and the same sampled layer matching. A cache built for another k is refused, naming it.
"""

from __future__ import annotations

import json
import shutil

import pytest

from vlsi_ray.config import ConfigError, load_config
from vlsi_ray.data.shards import read_rows
from vlsi_ray.metrics import read_metrics
from vlsi_ray.runners.local import run_local
from vlsi_ray.runners.ray.driver import run_ray
from vlsi_ray.signals.cache import CacheMismatchError, TeacherCache
from vlsi_ray.teacher.cache import build_cache

STEPS = dict(pretrain_teacher=15, pretrain_student=15, verbalize=5, interact=6, sft=3)
SIGNAL = ["signal.topk=16", "signal.storage=float32", "signal.tail_samples=4", "matching.strategy=multinomial"]

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def base_run(tmp_path_factory, local_ray, tiny_overrides, one_thread):
    """A run through step 1 and its teacher cache; returns (overrides, cfg, manifest)."""
    tmp = tmp_path_factory.mktemp("teacher_cache")
    overrides = tiny_overrides(tmp, "base", STEPS) + SIGNAL + [f"teacher.cache_dir={tmp / 'cache'}"]
    run_local(
        load_config(None, overrides + ["runner=local", "steps=[pretrain_teacher,pretrain_student,verbalize]", "eval_models=[]"])
    )
    cfg = load_config(None, overrides)
    manifest = build_cache(cfg)
    return overrides, cfg, manifest


def _step2(base_cfg, overrides, name: str, *extra: str) -> list[dict]:
    """Step 2 alone in a copy of the base run; returns its per-step metrics."""
    target = base_cfg.run_dir.parent / name
    shutil.copytree(base_cfg.run_dir, target, ignore=shutil.ignore_patterns("teacher_cache", "report.*", "metrics.jsonl"))
    cfg = load_config(None, overrides + [f"name={name}", "steps=[interact]", "eval_models=[]", *extra])
    (run_ray if cfg.runner == "ray" else run_local)(cfg)
    return [m for m in read_metrics(cfg.run_dir / "metrics.jsonl") if m.get("stage") == "interact" and "loss" in m]


def test_cache_holds_every_train_row(base_run):
    _, cfg, manifest = base_run

    rows, _ = read_rows(cfg.data.dir, split="train")
    assert manifest["rows"] == len(rows) == 300
    assert manifest["layers"] == 4 and manifest["k"] == 16  # teacher targets 1..3 + the final layer
    spec = manifest["spec"]
    assert (spec["signal.topk"], spec["signal.tail_samples"], spec["signal.storage"]) == (16, 4, "float32")
    assert spec["tail_seed"] == cfg.seed + 6 and spec["vocab_size"] > 16
    cache = TeacherCache(cfg.teacher_cache)
    some = [r["id"] for r in rows[:3]]
    arrays = cache.rows(some)
    # one answer letter + end token per row, 4 layers, k and m ids per token: (16 + 4) × (4 + 4) + 4 bytes per token and layer
    assert all(a["topk_ids"].shape == (4, 2, 16) and a["tail_sample_ids"].shape == (4, 2, 4) for a in arrays)
    assert manifest["bytes"] < 300 * 4 * 2 * ((16 + 4) * 8 + 4) * 1.5  # Parquet adds little to the raw codec
    with pytest.raises(KeyError, match="not in the teacher cache"):
        cache.rows(["no-such-row"])


def test_cached_step2_equals_live_step2_in_process(base_run):
    overrides, cfg, _ = base_run
    live = _step2(cfg, overrides, "live", "runner=local")
    cached = _step2(cfg, overrides, "cached", "runner=local", "teacher.source=cache")
    assert len(live) == len(cached) == STEPS["interact"]
    for a, b in zip(live, cached):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5, abs=1e-6)
        assert b["matched"] == a["matched"]
    assert len({json.dumps(m["matched"]) for m in live}) > 1  # the matching is sampled: the check is not vacuous


def test_ray_train_reads_the_cache(base_run):
    """The Ray runner's workers get the cache instead of teacher actors, with the same losses (to 1e-6, as the
    other equality tests) and the same sampled layer matching as in process."""
    overrides, cfg, _ = base_run
    local = _step2(cfg, overrides, "cached_local", "runner=local", "teacher.source=cache")
    ray_run = _step2(cfg, overrides, "cached_ray", "runner=ray", "teacher.source=cache", "train.use_gpu=false")
    assert len(ray_run) == len(local) == STEPS["interact"]
    for ours, ref in zip(ray_run, local):
        assert abs(ours["loss"] - ref["loss"]) <= 1e-6 * max(1.0, abs(ref["loss"]))
        assert ours["matched"] == ref["matched"]
    assert not (cfg.run_dir.parent / "cached_ray" / "interact" / "teacher_placement.json").exists()  # no teacher actors


def test_a_cache_for_another_k_is_refused(base_run):
    overrides, cfg, _ = base_run
    with pytest.raises(CacheMismatchError, match=r"signal\.topk=16 but this run needs 8"):
        _step2(cfg, overrides, "other_k", "runner=local", "teacher.source=cache", "signal.topk=8")


def test_missing_cache_is_a_config_error_before_any_work(tmp_path, tiny_overrides):
    cfg = load_config(None, tiny_overrides(tmp_path, "nocache") + ["teacher.source=cache", "runner=local"])
    with pytest.raises(ConfigError, match="jobs/teacher_cache.py"):
        run_local(cfg)
    assert not cfg.run_dir.exists() and not (tmp_path / "data").exists()
    with pytest.raises(ConfigError, match="signal.topk is null"):
        load_config(None, ["teacher.source=cache", "signal.topk=null"])
