"""Layer-wise verbalization traces on the tiny run, run plots from a metrics log, and jobs/verbalize.py."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from vlsi_ray.data.shards import read_rows
from vlsi_ray.eval.report import layer_loss_series, matching_counts, write_plots
from vlsi_ray.eval.traces import export_source, run_sources, trace_source, write_traces
from vlsi_ray.generation import ChatGenerator, SamplingParams
from vlsi_ray.models.verbalizer import Verbalizers

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
MAX_TOKENS = 4


@pytest.fixture(scope="module")
def row(tiny_run, one_thread):
    return read_rows(tiny_run.data, split="test")[0][0]


def test_run_sources_and_export_source(tiny_run, tmp_path):
    run = tiny_run.run
    sources = run_sources(run)  # the tiny run has no pretrain_student: "student before" is left out
    assert [(s.name, s.model_dir, s.verbalizers_dir) for s in sources] == [
        ("teacher", run / "pretrain_teacher", run / "verbalize" / "teacher_verbalizers"),
        ("student after distillation", run / "sft" / "student", run / "interact" / "student_verbalizers"),
    ]
    export = tmp_path / "export"
    shutil.copytree(run / "sft" / "student", export)
    with pytest.raises(FileNotFoundError, match="has no vlsi_verbalizers/"):
        export_source(export)
    shutil.copytree(run / "interact" / "student_verbalizers", export / "vlsi_verbalizers")
    assert export_source(export).verbalizers_dir == export / "vlsi_verbalizers"


def test_trace_has_one_row_per_verbalizer_layer_plus_final(tiny_run, row, tmp_path):
    sources = run_sources(tiny_run.run)
    traces = [trace_source(s, row, max_tokens=MAX_TOKENS) for s in sources]
    for source, trace in zip(sources, traces):
        layers = Verbalizers.load(source.verbalizers_dir).layers
        assert [(r["layer"], r["kind"]) for r in trace["layers"]] == [(layer, "verbalizer") for layer in layers] + [
            (trace["num_layers"], "final")
        ]
        for r in trace["layers"]:
            probs = [t["prob"] for t in r["top"]]
            assert len(probs) == 5 and probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-6
            assert 0 < len(r["token_ids"]) <= MAX_TOKENS and r["token_ids"][0] == r["top"][0]["id"]  # greedy = top-1
        assert len({r["text"] for r in trace["layers"]}) > 1  # the layers say different things
    # the final row is the model's own greedy answer
    student = ChatGenerator.from_pretrained(sources[-1].model_dir)
    assert traces[-1]["layers"][-1]["text"] == student.generate([row], SamplingParams(max_tokens=MAX_TOKENS))[0].text

    json_path, html_path = write_traces(tmp_path, row, traces)
    record = json.loads(json_path.read_text())
    assert record["answer"] == row["answer"] and [m["name"] for m in record["models"]] == [s.name for s in sources]
    page = html_path.read_text()
    assert page.count("<tr><td>") == sum(len(t["layers"]) for t in traces) == 4 + 3
    assert "data:image/png;base64," in page and "What " in page and "(final)" in page


def _metrics(t_l: int = 3) -> list[dict]:
    """A step log like the runners write: 2 stages of step 1, 8 steps of step 2 (matched indices known), SFT."""
    records = [
        {"stage": "verbalize/teacher", "step": s, "loss": 6.0 / s, "ce/1": 3.0 / s, "ce/2": 2.0 / s, "ce/3": 1.0 / s}
        for s in range(1, 9)
    ]
    records += [{"stage": "verbalize/student", "step": s, "loss": 4.0 / s, "ce/1": 2.5 / s, "ce/2": 1.5 / s} for s in range(1, 9)]
    for s in range(1, 9):  # early: student layer 0 -> teacher 0; late: -> teacher 1; student layer 1 -> teacher 2 always
        records.append(
            {
                "stage": "interact",
                "step": s,
                "loss": 1.0 / s,
                "kl/1": 0.5 / s,
                "kl/2": 0.3 / s,
                "kl/last": 0.2 / s,
                "matched": [[[0 if s <= 4 else 1], [t_l - 1]]],
            }
        )
    records += [{"stage": "sft", "step": s, "loss": 0.9 / s} for s in range(1, 9)]
    return records


def test_matching_counts_and_layer_series():
    metrics = _metrics()
    early, late = matching_counts([m for m in metrics if m["stage"] == "interact"], num_teacher_layers=3)
    np.testing.assert_array_equal(early, [[4, 0, 0], [0, 0, 4]])
    np.testing.assert_array_equal(late, [[0, 4, 0], [0, 0, 4]])
    series = layer_loss_series(metrics)
    assert {stage: sorted(keys) for stage, keys in series.items()} == {
        "verbalize/teacher": ["ce/1", "ce/2", "ce/3"],
        "verbalize/student": ["ce/1", "ce/2"],
        "interact": ["kl/1", "kl/2", "kl/last"],
    }
    assert series["interact"]["kl/2"][3] == (4, pytest.approx(0.075))


def test_verbalize_job_writes_plots_and_traces(tiny_run, tmp_path, one_thread, job):
    run = tmp_path / "run"
    shutil.copytree(tiny_run.run, run)
    (run / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in _metrics()))
    assert job("verbalize").main(["--run-dir", str(run), "--data", str(tiny_run.data), "--index", "1", "--max-tokens", "2"]) == 0
    for name in ("losses", "layer_losses", "matching"):
        data = (run / "plots" / f"{name}.png").read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 5000
    traces = json.loads((run / "traces" / "traces.json").read_text())
    assert traces["row_id"] == read_rows(tiny_run.data, split="test")[0][1]["id"]
    assert [len(m["layers"]) for m in traces["models"]] == [4, 3]
    assert write_plots(tmp_path / "no_run") == {}  # no metrics, no plots
