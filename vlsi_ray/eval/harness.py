"""Run a predictor over a benchmark with resumable partial results, then score and write JSON + Markdown.

Files in ``out_dir`` per set ``<name>``: ``<name>.predictions.jsonl`` (one ``{"index", "prediction",
"model"}`` per answered item, appended chunk by chunk: re-running skips the items already there),
``<name>.json`` (accuracy overall and per category, every scored item, skipped rows) and ``<name>.md``;
:func:`write_summary` adds ``summary.json`` / ``summary.md`` over several sets. Scores are always
recomputed from the saved raw answers, so a resumed run scores old and new answers alike.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

from tqdm import tqdm

from vlsi_ray.eval.benchmarks import YES_NO, Benchmark
from vlsi_ray.eval.predictors import Predictor
from vlsi_ray.eval.scoring import results_markdown, score_item, summarize

log = logging.getLogger(__name__)


def load_predictions(path: Path, model: str) -> dict[str, str]:
    """Saved answers ``{index: text}`` of ``path`` (empty if absent); refuses answers of another model.

    A line cut short by a killed run is dropped (and the file truncated after the last complete
    line) so that appending continues cleanly; its item is predicted again.
    """
    if not path.is_file():
        return {}
    raw = path.read_bytes()
    if raw and not raw.endswith(b"\n"):
        raw = raw[: raw.rfind(b"\n") + 1]
        path.write_bytes(raw)
        log.warning("dropped an incomplete last line of %s (an interrupted run); its item is predicted again", path)
    done = {}
    for line in raw.decode().splitlines():
        record = json.loads(line)
        if record.get("model") != model:
            raise ValueError(
                f"{path} holds answers of model {record.get('model')!r}, not {model!r}; "
                "pass another --out directory or delete the file to start over."
            )
        done[str(record["index"])] = record["prediction"]
    return done


def evaluate_benchmark(
    bench: Benchmark, predictor: Predictor, out_dir: str | Path, limit: int | None = None, progress: bool = True
) -> dict:
    """Answer every item of ``bench`` not yet in ``out_dir`` (the first ``limit`` items if given), score all, write files.

    Returns the results dict written to ``<name>.json`` (see :func:`~vlsi_ray.eval.scoring.summarize`
    for the numbers; plus ``dataset``, ``format``, ``source``, ``model``, ``skipped_rows``, ``items``).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    items = bench.items[:limit] if limit else bench.items
    path = out_dir / f"{bench.name}.predictions.jsonl"
    done = load_predictions(path, predictor.name)
    todo = [it for it in items if it.index not in done]
    print(f"[eval] {bench.name}: {len(items)} items, {len(items) - len(todo)} already answered in {path}", flush=True)
    with (
        path.open("a") as fh,
        tqdm(
            total=len(items), initial=len(items) - len(todo), desc=bench.name, unit="item", disable=not progress, mininterval=2.0
        ) as bar,
    ):
        for start in range(0, len(todo), max(1, predictor.chunk_size)):
            chunk = todo[start : start + max(1, predictor.chunk_size)]
            texts = predictor.predict(chunk)
            for item, text in zip(chunk, texts, strict=True):
                fh.write(json.dumps({"index": item.index, "prediction": text, "model": predictor.name}) + "\n")
                done[item.index] = text
            fh.flush()
            bar.update(len(chunk))
    scored = [score_item(it, done[it.index]) for it in items]
    yes_no = bool(items) and items[0].kind == YES_NO
    results = {
        "dataset": bench.name,
        "format": bench.format,
        "source": bench.source,
        "model": predictor.name,
        **summarize(scored, yes_no),
        "skipped_rows": bench.skipped,
        "items": scored,
    }
    (out_dir / f"{bench.name}.json").write_text(json.dumps(results, indent=2))
    (out_dir / f"{bench.name}.md").write_text(results_markdown([results]))
    print(
        f"[eval] {bench.name}: {100 * results['accuracy']:.1f}% of {results['n']} "
        f"({results['unparsed']} unparsed answers counted wrong)",
        flush=True,
    )
    return results


def write_summary(out_dir: str | Path, results: Sequence[dict]) -> Path:
    """``summary.json`` (results without per-item records) and ``summary.md`` over all sets; returns the .md path."""
    out_dir = Path(out_dir)
    (out_dir / "summary.json").write_text(json.dumps([{k: v for k, v in r.items() if k != "items"} for r in results], indent=2))
    path = out_dir / "summary.md"
    path.write_text(results_markdown(results))
    return path
