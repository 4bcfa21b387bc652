"""The in-process runner end to end on tiny models and data (numbers pinned, the report re-derived from the\ncheckpoints and logs), and config errors caught before any output."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from vlsi_ray.config import ConfigError, load_config
from vlsi_ray.data.collate import IGNORE_INDEX
from vlsi_ray.data.shards import read_rows
from vlsi_ray.data.synthetic import SCORED_TASKS
from vlsi_ray.eval.heldout import is_letter, option_letters
from vlsi_ray.metrics import read_metrics
from vlsi_ray.models.backbone import Backbone
from vlsi_ray.models.verbalizer import Verbalizers
from vlsi_ray.prepare import make_collator
from vlsi_ray.runners.local import run_local

from tiny_config import TINY_STEPS
from tiny_run import PLANTED, e2e_overrides

ROOT = Path(__file__).resolve().parents[2]
STAGE_LABELS = (
    "pretrain_teacher", "pretrain_student", "verbalize/teacher", "verbalize/student", "interact", "baseline_sft", "sft",
)  # fmt: skip
MODELS = ("teacher", "student_base", "student_sft_only", "vlsi_without_sft", "vlsi")
#: Checkpoint directories (relative to the run dir) and what marks each as complete.
MODEL_DIRS = ("pretrain_teacher", "pretrain_student", "interact/student", "baseline_sft/student", "sft/student")
VERBALIZER_DIRS = ("verbalize/teacher_verbalizers", "verbalize/student_verbalizers", "interact/student_verbalizers")
STAGE_DIRS = ("pretrain_teacher", "pretrain_student", "verbalize", "interact", "baseline_sft", "sft")


#: (first, last) logged loss of each stage in the seeded end-to-end run (tests/tiny_run.py, one thread), as
#: measured on torch 2.13.0 CPU; a change to the data order, the models, a loss or the matching moves them.
PINNED = {
    "pretrain_teacher": (6.134553, 1.353438),
    "pretrain_student": (6.040613, 2.926802),
    "verbalize/teacher": (6.591771, 4.034808),
    "verbalize/student": (7.039703, 5.896274),
    "interact": (1.915225, 1.846553),
    "baseline_sft": (2.930774, 1.858930),
    "sft": (2.937829, 1.859384),
}
PINNED_REL = 1e-3  # float sums may differ between machines' CPU kernels; a change to the method moves them far more
#: The evaluated models and the checkpoints they were scored from.
CHECKPOINTS = {
    "teacher": "pretrain_teacher",
    "student_base": "pretrain_student",
    "student_sft_only": "baseline_sft/student",
    "vlsi_without_sft": "interact/student",
    "vlsi": "sft/student",
}


@pytest.fixture(scope="module")
def e2e(e2e_run):
    """The session's trained run (conftest ``e2e_run``): (config, report, seconds)."""
    print(f"end-to-end run: {e2e_run.seconds:.1f}s")
    return e2e_run.cfg, e2e_run.report, e2e_run.seconds


def rescored(cfg, model_dir: Path, rows: list[dict], letters: str) -> dict:
    """The checkpoint in ``model_dir`` scored again, one row at a time from its full logits (the run scores
    batches through eval/heldout.py): option-letter accuracy (the letter whose token ranks highest at the
    first response position) overall and per task, and the loss in nats per response token."""
    backbone = Backbone.from_pretrained(model_dir)
    collate = make_collator(backbone, cfg)
    ids = [backbone.tokenizer.convert_tokens_to_ids(c) for c in letters]
    right, per_task, nll, tokens = 0, {}, 0.0, 0
    with torch.no_grad():
        for row in rows:
            batch = collate([row])
            labels = batch["labels"][0]
            positions = (labels[1:] != IGNORE_INDEX).nonzero().flatten()  # each predicts the next response token
            logits = backbone.forward(batch).logits[0].float()
            nll += float(F.cross_entropy(logits[positions], labels[positions + 1], reduction="sum"))
            tokens += len(positions)
            hit = letters[int(logits[positions[0], ids].argmax())] == row["answer"]
            right += hit
            per_task.setdefault(row["task"], []).append(hit)
    return {
        "overall": right / len(rows),
        "n": len(rows),
        "per_task": {t: sum(h) / len(h) for t, h in per_task.items()},
        "loss": nll / tokens,
        "tokens": tokens,
    }


@pytest.mark.integration
class TestEndToEnd:
    def test_every_stage_loss_is_the_seeded_runs(self, e2e):
        cfg, _, _ = e2e
        records = list(read_metrics(cfg.run_dir / "metrics.jsonl"))
        assert {r["stage"] for r in records} == set(STAGE_LABELS)
        for label in STAGE_LABELS:
            losses = [r["loss"] for r in records if r["stage"] == label]
            settings = "sft" if label == "baseline_sft" else label.split("/")[0]
            assert len(losses) == TINY_STEPS[settings], label
            assert torch.isfinite(torch.tensor(losses)).all(), label
            print(f'    "{label}": ({losses[0]:.6f}, {losses[-1]:.6f}),')
            assert losses[0] == pytest.approx(PINNED[label][0], rel=PINNED_REL), label
            assert losses[-1] == pytest.approx(PINNED[label][1], rel=PINNED_REL), label
        interact = [r for r in records if r["stage"] == "interact"]
        assert all("matched" in r and "kl/last" in r for r in interact)

    def test_report_is_a_rescoring_of_the_saved_checkpoints(self, e2e):
        cfg, report, _ = e2e
        test_rows, _ = read_rows(Path(cfg.data.dir), split="test")
        scored = [r for r in test_rows if is_letter(r["answer"])]
        assert len(scored) == sum(r["task"] in SCORED_TASKS for r in test_rows) == 100
        saved = json.loads((cfg.run_dir / "report.json").read_text())
        assert saved["accuracy"] == report["accuracy"] and set(saved["accuracy"]) == set(MODELS)
        letters = option_letters(r["answer"] for r in test_rows)
        assert len(scored) == len(test_rows)  # every test row has a letter answer: the loss is over the same rows
        for name, rel in CHECKPOINTS.items():
            again = rescored(cfg, cfg.run_dir / rel, test_rows, letters)
            result = saved["accuracy"][name]
            assert result["n"] == again["n"] == 100, name
            assert result["overall"] == pytest.approx(again["overall"], abs=1e-12), name
            assert result["per_task"] == pytest.approx(again["per_task"], abs=1e-12), name
            assert result["tokens"]["test"]["all"] == again["tokens"], name
            assert result["loss"]["test"]["all"] == pytest.approx(again["loss"], rel=1e-5), name
        losses = [saved["accuracy"][name]["loss"]["test"]["all"] for name in CHECKPOINTS]
        assert len(set(losses)) == len(losses)  # five different models were scored, not one five times
        assert (cfg.run_dir / "report.md").stat().st_size > 0

    def test_matching_plot_counts_are_the_logged_matches(self, e2e):
        cfg, _, _ = e2e
        interact = [r for r in read_metrics(cfg.run_dir / "metrics.jsonl") if r["stage"] == "interact"]
        drawn = json.loads((cfg.run_dir / "plots" / "matching.json").read_text())
        assert (cfg.run_dir / "plots" / "matching.png").stat().st_size > 0
        half = (len(interact) + 1) // 2
        halves = [r["step"] for r in interact[:half]], [r["step"] for r in interact[half:]]
        for half, steps in zip(drawn["halves"], halves):
            assert half["steps"] == steps
            counts = [[0] * len(drawn["teacher_layers"]) for _ in drawn["student_layers"]]
            for r in interact:
                if r["step"] in steps:
                    for micro in r["matched"]:
                        for i, picks in enumerate(micro):
                            for j in picks:
                                counts[i][j] += 1
            assert half["counts"] == counts
            assert sum(map(sum, counts)) == len(steps) * len(drawn["student_layers"])  # one draw per student layer and step
        assert len({tuple(map(tuple, r["matched"][0])) for r in interact}) > 1  # sampled: the pairs vary over steps

    def test_planted_bad_rows_are_the_skipped_rows(self, e2e):
        cfg, report, _ = e2e
        assert report["skipped_rows"] == {split: len(PLANTED.get(split, ())) for split in ("train", "val", "test")}
        assert json.loads((cfg.run_dir / "report.json").read_text())["skipped_rows"] == report["skipped_rows"]
        assert "Rows skipped as corrupt" in (cfg.run_dir / "report.md").read_text()

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

    def test_rerun_skips_training(self, e2e, capsys):
        cfg, report, _ = e2e
        metrics = cfg.run_dir / "metrics.jsonl"
        lines = metrics.read_text()
        stages = {p: p.read_text() for p in cfg.run_dir.glob("*/stage.json")}
        capsys.readouterr()
        again = run_local(load_config(None, e2e_overrides(Path(cfg.output_dir).parent)))
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
