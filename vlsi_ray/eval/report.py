"""The run report: ``report.json``, ``report.md`` and PNG plots of losses and layer matching.

Plots (matplotlib, Agg backend) are drawn from ``metrics.jsonl`` by :func:`write_plots`:

- ``losses.png``: the training loss of every stage against its optimizer step;
- ``layer_losses.png``: per-layer losses as logged, ``ce/<block>`` of each verbalizer in step 1
  (``verbalize/teacher``, ``verbalize/student``) and ``kl/<block>`` of each student verbalizer plus
  the last-layer term (``kl/last`` or ``ce/last``) in step 2 (``interact``);
- ``matching.png``: how often each student target layer matched each teacher target layer in the
  first and second halves of step 2 (the paper's Fig. 5). ``matched`` holds 0-based positions in
  the teacher's target-layer list; ticks show the block numbers when the run's verbalizers are saved.
  The counts behind it are in ``matching.json``.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import numpy as np

from vlsi_ray.metrics import read_metrics
from vlsi_ray.models.verbalizer import CONFIG_FILE
from vlsi_ray.recipe.layout import RunLayout

MODEL_LABELS = {
    "teacher": "teacher (tiny, pretrained)",
    "student_base": "student before training",
    "student_sft_only": "student, SFT only (same data, same steps as step 3)",
    "vlsi_without_sft": "VLsI student, steps 1+2 (no step 3)",
    "vlsi": "VLsI student, steps 1+2+3",
}


def write_report(run_dir: str | Path, report: dict) -> dict:
    """Write ``report.json``, ``report.md`` and ``plots/*.png`` into ``run_dir``; return the plot paths."""
    run_dir = Path(run_dir)
    plots = write_plots(run_dir)
    report = dict(report, plots={k: str(v.relative_to(run_dir)) for k, v in plots.items()})
    layout = RunLayout(run_dir)
    layout.report_json.write_text(json.dumps(report, indent=2))
    layout.report_md.write_text(render_markdown(report, run_dir))
    return plots


def write_plots(run_dir: str | Path, out_dir: str | Path | None = None) -> dict[str, Path]:
    """Draw every plot that ``<run_dir>/metrics.jsonl`` has data for into ``out_dir`` (default ``<run_dir>/plots``).

    Returns ``{"losses" | "layer_losses" | "matching": path}`` for the plots written.
    """
    run_dir = Path(run_dir)
    layout = RunLayout(run_dir)
    out = Path(out_dir) if out_dir is not None else layout.plots
    metrics = list(read_metrics(layout.metrics))
    plots: dict[str, Path] = {}
    if not metrics:
        return plots
    plots["losses"] = plot_losses(metrics, out / "losses.png")
    if layer_loss_series(metrics):
        plots["layer_losses"] = plot_layer_losses(metrics, out / "layer_losses.png")
    matched = [m for m in metrics if m.get("stage") == "interact" and "matched" in m]
    if matched:
        plots["matching"] = plot_matching(
            matched,
            out / "matching.png",
            _target_layers(layout.verbalizers("teacher")),
            _target_layers(layout.verbalizers("student", "interact")),
        )
    return plots


def _target_layers(verbalizers_dir: Path) -> list[int] | None:
    path = verbalizers_dir / CONFIG_FILE
    return json.loads(path.read_text())["layers"] if path.is_file() else None


def render_markdown(report: dict, run_dir: Path) -> str:
    """Markdown summary: accuracy (overall, per task, per source), held-out loss per source, stage times, plots."""
    acc = report.get("accuracy", {})
    lines = [f"# VLsI run `{report.get('run')}`", ""]
    n = max((r.get("n", 0) for r in acc.values()), default=0)
    if acc and n:
        lines += _accuracy_table(acc, "per_task", "Test accuracy (rows with an option-letter answer)")
        lines.append(f"{n} test questions.")
        if len({s for r in acc.values() for s in r.get("per_source", {})}) > 1:
            lines += ["", *_accuracy_table(acc, "per_source", "Test accuracy per source")]
    elif acc:
        lines += ["No test row has an option-letter answer: the held-out loss below is the score.", ""]
    for split in sorted({split for r in acc.values() for split in r.get("loss", {})}, key=lambda s: s != "test"):
        sources = list(next(r["loss"][split] for r in acc.values() if split in r.get("loss", {})))
        lines += ["", f"## Held-out loss on the {split} split (nats per response token)", ""]
        lines.append("| model | " + " | ".join(sources) + " |")
        lines.append("|---|" + "---|" * len(sources))
        for name, r in acc.items():
            cells = [f"{r['loss'][split][s]:.4f}" if s in r["loss"].get(split, {}) else "–" for s in sources]
            lines.append(f"| {MODEL_LABELS.get(name, name)} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "## Stages",
        "",
        "| stage | optimizer steps | first loss | last loss | seconds |",
        "|---|---|---|---|---|",
    ]
    for stage_file in sorted(run_dir.glob("*/stage.json"), key=lambda p: p.stat().st_mtime):
        s = json.loads(stage_file.read_text())
        first, last = s.get("first_loss"), s.get("last_loss")
        fmt = lambda v: f"{v:.4f}" if v is not None else "–"  # noqa: E731
        lines.append(f"| {s['stage']} | {s['steps']} | {fmt(first)} | {fmt(last)} | {s['seconds']} |")
    if report.get("skipped_rows") and any(report["skipped_rows"].values()):
        lines += ["", f"Rows skipped as corrupt: {report['skipped_rows']}"]
    for name, path in report.get("plots", {}).items():
        lines += ["", f"![{name}]({path})"]
    lines += ["", f"Total time {report.get('seconds', 0):.0f} s.", ""]
    return "\n".join(lines)


def _accuracy_table(acc: dict, key: str, title: str) -> list[str]:
    """A Markdown table of accuracy (%) per model: overall, then one column per entry of ``result[key]``."""
    columns = sorted({c for r in acc.values() for c in r.get(key, {})})
    lines = [f"## {title}", "", "| model | overall | " + " | ".join(columns) + " |", "|---|---|" + "---|" * len(columns)]
    for name, r in acc.items():
        cells = [f"{100 * r[key][c]:.1f}" if c in r.get(key, {}) else "–" for c in columns]
        lines.append(f"| {MODEL_LABELS.get(name, name)} | **{100 * r['overall']:.1f}** | " + " | ".join(cells) + " |")
    return lines + [""]


def plot_losses(metrics: list[dict], path: Path) -> Path:
    """One panel per stage: training loss against optimizer step."""
    import matplotlib  # noqa: PLC0415 - pyplot, Agg backend, only when a plot is drawn

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415 - pyplot, Agg backend, only when a plot is drawn

    stages: dict[str, list[tuple[int, float]]] = defaultdict(list)
    for m in metrics:
        if "loss" in m and "stage" in m:
            stages[m["stage"]].append((m["step"], m["loss"]))
    fig, axes = plt.subplots(1, len(stages), figsize=(3.2 * len(stages), 2.8), squeeze=False)
    for ax, (stage, points) in zip(axes[0], stages.items()):
        steps, losses = zip(*points)
        ax.plot(steps, losses, lw=1)
        ax.set_title(stage, fontsize=9)
        ax.set_xlabel("optimizer step", fontsize=8)
        ax.tick_params(labelsize=7)
    axes[0][0].set_ylabel("loss", fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


def layer_loss_series(metrics: list[dict]) -> dict[str, dict[str, list[tuple[int, float]]]]:
    """Per-layer losses by stage: ``{stage: {"ce/3" | "kl/2" | "kl/last" ...: [(step, value)]}}``, in logged order."""
    series: dict[str, dict[str, list[tuple[int, float]]]] = defaultdict(lambda: defaultdict(list))
    for m in metrics:
        for key, value in m.items():
            if key.startswith(("ce/", "kl/")) and isinstance(value, (int, float)):
                series[m["stage"]][key].append((m["step"], float(value)))
    return {stage: dict(keys) for stage, keys in series.items()}


def plot_layer_losses(metrics: list[dict], path: Path) -> Path:
    """One panel per stage with per-layer losses: a line per layer (moving average over ~1/20 of the stage)."""
    import matplotlib  # noqa: PLC0415 - pyplot, Agg backend, only when a plot is drawn

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415 - pyplot, Agg backend, only when a plot is drawn

    series = layer_loss_series(metrics)
    fig, axes = plt.subplots(1, len(series), figsize=(3.6 * len(series), 3.0), squeeze=False)
    for ax, (stage, keys) in zip(axes[0], series.items()):
        ordered = sorted(keys, key=lambda k: (k.endswith("/last"), int(k.split("/")[1]) if k.split("/")[1].isdigit() else 0))
        colours = plt.cm.viridis(np.linspace(0, 0.9, len(ordered)))
        for key, colour in zip(ordered, colours):
            steps, values = map(np.asarray, zip(*keys[key]))
            window = max(1, len(values) // 20)
            smooth = np.convolve(values, np.ones(window) / window, mode="valid")
            label = "last layer" if key.endswith("/last") else f"block {key.split('/')[1]}"
            ax.plot(steps[window - 1 :], smooth, lw=1, color="k" if key.endswith("/last") else colour, label=label)
        what = "CE per verbalizer" if ordered[0].startswith("ce/") else "KL to the matched teacher layer"
        ax.set_title(f"{stage}: {what}", fontsize=9)
        ax.set_xlabel("optimizer step", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=6, ncol=2)
    axes[0][0].set_ylabel("loss", fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


def matching_counts(matched: list[dict], num_teacher_layers: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Counts ``[t_s, t_l]`` of matched teacher layer per student layer, first and second half of step 2.

    ``t_l`` is ``num_teacher_layers``, or one past the largest index seen if that is more.
    """
    draws = [m["matched"] for m in matched]  # per step: per micro-batch: per student layer: indices
    t_s = len(draws[0][0])
    t_l = max(num_teacher_layers or 0, 1 + max(j for step in draws for micro in step for layer in micro for j in layer))
    counts = np.zeros((2, t_s, t_l))
    half = len(draws) / 2
    for n, step in enumerate(draws):
        for micro in step:
            for i, layer in enumerate(micro):
                for j in layer:
                    counts[int(n >= half), i, j] += 1
    return counts[0], counts[1]


def plot_matching(
    matched: list[dict], path: Path, teacher_layers: list[int] | None = None, student_layers: list[int] | None = None
) -> Path:
    """Heatmaps of how often each student layer matched each teacher layer, early vs late in step 2.

    Each row is normalised to the share of its student layer's draws; ticks are block numbers when
    ``teacher_layers`` / ``student_layers`` (the target layers) are given, else 0-based positions.
    The counts drawn go beside the picture (``path`` with ``.json``: per half, its steps and ``[t_s, t_l]`` counts).
    """
    import matplotlib  # noqa: PLC0415 - pyplot, Agg backend, only when a plot is drawn

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415 - pyplot, Agg backend, only when a plot is drawn

    early, late = matching_counts(matched, len(teacher_layers) if teacher_layers else None)
    if teacher_layers and len(teacher_layers) != early.shape[1] or student_layers and len(student_layers) != early.shape[0]:
        teacher_layers = student_layers = None  # saved verbalizers do not fit the log: show positions
    steps = [m["step"] for m in matched]
    halves = (steps[: (len(steps) + 1) // 2], steps[(len(steps) + 1) // 2 :])  # the split of matching_counts
    titles = [f"steps {h[0]}–{h[-1]}" if h else "no steps" for h in halves]
    drawn = {
        "teacher_layers": teacher_layers,
        "student_layers": student_layers,
        "halves": [{"steps": h, "counts": c.astype(int).tolist()} for h, c in zip(halves, (early, late))],
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.with_suffix(".json").write_text(json.dumps(drawn))
    fig, axes = plt.subplots(1, 2, figsize=(7.6, 2.9))
    for ax, counts, title in zip(axes, (early, late), titles):
        freq = counts / np.maximum(1, counts.sum(axis=1, keepdims=True))
        image = ax.imshow(freq, cmap="viridis", vmin=0, vmax=1, aspect="auto")
        ax.set_title(f"step 2, {title}", fontsize=9)
        ax.set_xticks(range(freq.shape[1]), teacher_layers or range(freq.shape[1]))
        ax.set_yticks(range(freq.shape[0]), student_layers or range(freq.shape[0]))
        ax.set_xlabel("teacher target layer" + ("" if teacher_layers else " (index)"), fontsize=8)
        ax.set_ylabel("student target layer" + ("" if student_layers else " (index)"), fontsize=8)
        ax.tick_params(labelsize=7)
    fig.colorbar(image, ax=list(axes), fraction=0.04, label="share of draws")
    return _save(fig, path, bbox_inches="tight")


def _save(fig, path: Path, **kwargs) -> Path:
    """Write ``fig`` to ``path`` (PNG, 110 dpi) and free it."""
    import matplotlib.pyplot as plt  # noqa: PLC0415 - pyplot, Agg backend, only when a plot is drawn

    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, **kwargs)
    plt.close(fig)
    return path
