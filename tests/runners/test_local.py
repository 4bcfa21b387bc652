"""The in-process runner end to end on tiny models and data, and config errors caught before any output."""

from __future__ import annotations

import importlib.util
import json
import time
from pathlib import Path

import pytest
import torch

from vlsi_ray.config import ConfigError, load_config
from vlsi_ray.data.shards import read_rows
from vlsi_ray.data.synthetic import SCORED_TASKS
from vlsi_ray.metrics import read_metrics
from vlsi_ray.models.verbalizer import Verbalizers
from vlsi_ray.runners.local import run_local

from tiny_config import TINY_STEPS

ROOT = Path(__file__).resolve().parents[2]
STAGE_LABELS = (
    "pretrain_teacher", "pretrain_student", "verbalize/teacher", "verbalize/student", "interact", "baseline_sft", "sft",
)  # fmt: skip
MODELS = ("teacher", "student_base", "student_sft_only", "vlsi_without_sft", "vlsi")
#: Checkpoint directories (relative to the run dir) and what marks each as complete.
MODEL_DIRS = ("pretrain_teacher", "pretrain_student", "interact/student", "baseline_sft/student", "sft/student")
VERBALIZER_DIRS = ("verbalize/teacher_verbalizers", "verbalize/student_verbalizers", "interact/student_verbalizers")
STAGE_DIRS = ("pretrain_teacher", "pretrain_student", "verbalize", "interact", "baseline_sft", "sft")


@pytest.fixture(scope="module")
def e2e(tmp_path_factory, one_thread, tiny_overrides):
    """One full run (all steps + the SFT baseline); returns (config, report, seconds)."""
    tmp = tmp_path_factory.mktemp("e2e")
    cfg = load_config(None, tiny_overrides(tmp, "e2e"))
    started = time.perf_counter()
    report = run_local(cfg)
    seconds = time.perf_counter() - started
    print(f"end-to-end run: {seconds:.1f}s")
    return cfg, report, seconds


@pytest.mark.integration
class TestEndToEnd:
    def test_every_stage_loss_falls(self, e2e):
        cfg, _, _ = e2e
        records = list(read_metrics(cfg.run_dir / "metrics.jsonl"))
        assert {r["stage"] for r in records} == set(STAGE_LABELS)
        for label in STAGE_LABELS:
            losses = [r["loss"] for r in records if r["stage"] == label]
            settings = "sft" if label == "baseline_sft" else label.split("/")[0]
            assert len(losses) == TINY_STEPS[settings], label
            assert torch.isfinite(torch.tensor(losses)).all(), label
            first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
            print(f"{label}: {first:.4f} -> {last:.4f}")
            assert last < first, f"{label}: loss did not fall ({first:.4f} -> {last:.4f})"
        interact = [r for r in records if r["stage"] == "interact"]
        assert all("matched" in r and "kl/last" in r for r in interact)

    def test_report_accuracies(self, e2e):
        cfg, report, _ = e2e
        test_rows, _ = read_rows(Path(cfg.data.dir), split="test")
        scored = sum(r["task"] in SCORED_TASKS for r in test_rows)
        assert scored == 100
        saved = json.loads((cfg.run_dir / "report.json").read_text())
        assert saved["accuracy"] == report["accuracy"]
        assert set(saved["accuracy"]) == set(MODELS)
        for name in MODELS:
            result = saved["accuracy"][name]
            assert 0.0 <= result["overall"] <= 1.0, name
            assert result["n"] == scored, name
            assert all(0.0 <= v <= 1.0 for v in result["per_task"].values()), name
        assert (cfg.run_dir / "report.md").stat().st_size > 0

    def test_plots_exist(self, e2e):
        cfg, _, _ = e2e
        for plot in ("losses.png", "matching.png"):
            path = cfg.run_dir / "plots" / plot
            assert path.is_file() and path.stat().st_size > 0, plot

    def test_checkpoints_exist(self, e2e):
        cfg, _, _ = e2e
        run = cfg.run_dir
        assert (run / "config.yaml").is_file()
        for stage in STAGE_DIRS:
            summary = json.loads((run / stage / "stage.json").read_text())
            assert summary["stage"] == stage
        for rel in MODEL_DIRS:
            assert (run / rel / "config.json").is_file(), rel
            assert (run / rel / "model.safetensors").is_file(), rel
            assert (run / rel / "vlsi_backbone.json").is_file(), rel
            assert (run / rel / "tokenizer.json").is_file(), rel
        for rel in VERBALIZER_DIRS:
            assert Verbalizers.exists(run / rel), rel

    def test_rerun_skips_training(self, e2e, capsys, tiny_overrides):
        cfg, report, _ = e2e
        metrics = cfg.run_dir / "metrics.jsonl"
        lines = metrics.read_text()
        stages = {p: p.read_text() for p in cfg.run_dir.glob("*/stage.json")}
        capsys.readouterr()
        again = run_local(load_config(None, tiny_overrides(Path(cfg.output_dir).parent, "e2e")))
        out = capsys.readouterr().out
        assert metrics.read_text() == lines  # no new training records
        assert {p: p.read_text() for p in cfg.run_dir.glob("*/stage.json")} == stages
        assert "] steps " not in out  # run_steps never started
        assert again["accuracy"] == report["accuracy"]


# ------------------------------------------------------------------------------------------ config errors
def _distill_main():
    spec = importlib.util.spec_from_file_location("distill_job", ROOT / "jobs" / "distill.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


@pytest.mark.parametrize("bad", ["stages.sft.bogus=1", "matching.strategy=greedy", "seed"])
def test_bad_config_fails_before_writing_anything(tmp_path, capsys, bad):
    out_dir, data_dir = tmp_path / "runs", tmp_path / "data"
    code = _distill_main()([f"output_dir={out_dir}", f"data.dir={data_dir}", "name=bad", bad])
    assert code == 2
    assert "config error" in capsys.readouterr().err
    assert not out_dir.exists() and not data_dir.exists()
    assert not any(tmp_path.iterdir())


def test_real_checkpoints_without_shards_stop_before_any_work(hub_worlds, tmp_path):
    """No silent fallback: with checkpoint paths and an empty data.dir the run refuses, naming the fix,
    instead of training a real model on the synthetic shapes."""
    world = hub_worlds("qwen2_vl")
    overrides = world.overrides("no-data", f"data.dir={tmp_path / 'empty'}", f"output_dir={tmp_path / 'runs'}")
    cfg = load_config(None, [o for o in overrides if not o.startswith("data.synthetic.generate")])
    with pytest.raises(
        ConfigError, match=r"has no Parquet shards of its own .*jobs/prepare_data.py .*data.synthetic.generate=true"
    ):
        run_local(cfg)
    assert not (tmp_path / "runs").exists() and not (tmp_path / "empty").exists()
    assert (
        _distill_main()(
            [f"--config={ROOT / 'conf' / 'tiny.yaml'}", *[o for o in overrides if not o.startswith("data.synthetic.generate")]]
        )
        == 2
    )
