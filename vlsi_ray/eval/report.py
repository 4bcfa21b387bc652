"""The run report: ``report.json``, ``report.md`` and PNG plots of losses and layer matching.

Plots (matplotlib, Agg backend) are drawn from ``metrics.jsonl``: one loss curve per stage, and the
matched teacher layer of each student layer over step 2 (early vs late halves: the paper's Fig. 5).
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import numpy as np

from vlsi_ray.metrics import read_metrics

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
    metrics = list(read_metrics(run_dir / "metrics.jsonl"))
    plots = {}
    if metrics:
        plots["losses"] = plot_losses(metrics, run_dir / "plots" / "losses.png")
        matched = [m for m in metrics if m.get("stage") == "interact" and "matched" in m]
        if matched:
            plots["matching"] = plot_matching(matched, run_dir / "plots" / "matching.png")
    report = dict(report, plots={k: str(v.relative_to(run_dir)) for k, v in plots.items()})
    (run_dir / "report.json").write_text(json.dumps(report, indent=2))
    (run_dir / "report.md").write_text(render_markdown(report, run_dir))
    return plots


def render_markdown(report: dict, run_dir: Path) -> str:
    """Markdown summary: accuracy table (overall and per task), stage times, plots."""
    acc = report.get("accuracy", {})
    tasks = sorted({t for r in acc.values() for t in r.get("per_task", {})})
    lines = [f"# VLsI run `{report.get('run')}`", "", "## Test accuracy (multiple choice, chance 25%)", ""]
    lines.append("| model | overall | " + " | ".join(tasks) + " |")
    lines.append("|---|---|" + "---|" * len(tasks))
    for name, r in acc.items():
        cells = [f"{100 * r['per_task'].get(t, float('nan')):.1f}" for t in tasks]
        lines.append(f"| {MODEL_LABELS.get(name, name)} | **{100 * r['overall']:.1f}** | " + " | ".join(cells) + " |")
    n = next(iter(acc.values()), {}).get("n", 0)
    lines += ["", f"{n} test questions.", "", "## Stages", "", "| stage | optimizer steps | first loss | last loss | seconds |", "|---|---|---|---|---|"]
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


def plot_losses(metrics: list[dict], path: Path) -> Path:
    """One panel per stage: training loss against optimizer step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def matching_counts(matched: list[dict]) -> tuple[np.ndarray, np.ndarray]:
    """Counts ``[2, t_s, t_l]`` of matched teacher layer per student layer, first vs second half of step 2."""
    draws = [m["matched"] for m in matched]  # per step: per micro-batch: per student layer: indices
    t_s = len(draws[0][0])
    t_l = 1 + max(j for step in draws for micro in step for layer in micro for j in layer)
    counts = np.zeros((2, t_s, t_l))
    half = len(draws) / 2
    for n, step in enumerate(draws):
        for micro in step:
            for i, layer in enumerate(micro):
                for j in layer:
                    counts[int(n >= half), i, j] += 1
    return counts[0], counts[1]


def plot_matching(matched: list[dict], path: Path) -> Path:
    """Heatmaps of how often each student layer matched each teacher layer, early vs late in step 2."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    early, late = matching_counts(matched)
    fig, axes = plt.subplots(1, 2, figsize=(7, 2.8))
    for ax, counts, title in ((axes[0], early, "first half of step 2"), (axes[1], late, "second half")):
        freq = counts / np.maximum(1, counts.sum(axis=1, keepdims=True))
        ax.imshow(freq, cmap="viridis", vmin=0, vmax=1, aspect="auto")
        ax.set_title(title, fontsize=9)
        ax.set_xticks(range(freq.shape[1]))
        ax.set_yticks(range(freq.shape[0]))
        ax.set_xlabel("teacher target layer (index)", fontsize=8)
        ax.set_ylabel("student target layer", fontsize=8)
        ax.tick_params(labelsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
