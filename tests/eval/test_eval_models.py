"""End-to-end evaluation with the tiny run's real student (the endpoint client is tested against the Serve app in tests/serve)."""

from __future__ import annotations

import json

import pytest

from vlsi_ray.eval.benchmarks import mcq_benchmark
from vlsi_ray.eval.predictors import EndpointError, EndpointPredictor, chat_row
from vlsi_ray.eval.scoring import score_item
from vlsi_ray.generation import ChatGenerator, SamplingParams

MAX_TOKENS = 4


@pytest.fixture(scope="module")
def generator(tiny_run, one_thread):
    return ChatGenerator.from_pretrained(tiny_run.run / "sft" / "student")


def test_eval_job_scores_a_local_checkpoint(tiny_run, fixture_sets, generator, tmp_path, job):
    out = tmp_path / "eval"
    argv = [
        "--model",
        str(tiny_run.run / "sft" / "student"),
        "--synthetic",
        str(tiny_run.data),
        "--limit",
        "10",
        "--mcq",
        str(fixture_sets.mcq),
        "--yes-no",
        str(fixture_sets.pope_tsv),
        "--out",
        str(out),
        "--max-tokens",
        str(MAX_TOKENS),
        "--batch-size",
        "8",
        "--no-progress",
    ]
    assert job("eval").main(argv) == 0

    bench = mcq_benchmark(fixture_sets.mcq)
    for name, n, categories in (
        ("synthetic", 10, {"colour", "shape", "count", "position", "pattern"}),
        ("mcq", 10, {"colour", "shape", "count", "position", "pattern"}),
        ("pope", 10, {"adversarial", "random"}),
    ):  # --limit 10 applies to every set
        result = json.loads((out / f"{name}.json").read_text())
        assert result["n"] == n and set(result["per_category"]) == categories
        assert result["model"] == str((tiny_run.run / "sft" / "student").resolve())
        assert result["accuracy"] == sum(r["correct"] for r in result["items"]) / n
        assert sum(c["n"] for c in result["per_category"].values()) == sum(len(r["categories"]) for r in result["items"])
    # the saved answers are the generator's greedy answers for the same batches (8 + 2 rows)
    saved = [json.loads(line) for line in (out / "mcq.predictions.jsonl").read_text().splitlines()]
    params = SamplingParams(max_tokens=MAX_TOKENS)
    direct = [
        c.text for chunk in (bench.items[:8], bench.items[8:]) for c in generator.generate([chat_row(it) for it in chunk], params)
    ]
    assert [r["prediction"] for r in saved] == direct
    scored = json.loads((out / "mcq.json").read_text())["items"]
    assert scored == [score_item(it, text) for it, text in zip(bench.items, direct)]
    summary = (out / "summary.md").read_text()
    assert all(f"| {name} | {n} |" in summary for name, n in (("synthetic", 10), ("mcq", 10), ("pope", 10)))


def test_unreachable_endpoint_fails_clearly():
    with pytest.raises(EndpointError, match="cannot reach .* after 2 tries"):
        EndpointPredictor("http://127.0.0.1:9", retries=1, backoff=0.01, timeout=2)
