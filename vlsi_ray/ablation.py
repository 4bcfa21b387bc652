"""The paper's ablations at tiny scale: Table 4(b)/(c), 4(d) and 4(e) as config variants, runs and tables.

Every variant is a list of ``key=value`` overrides on one base config (``conf/tiny.yaml``), run by
the in-process runner (:func:`vlsi_ray.runners.local.run_local`). All variants start from the same
pretrained teacher and base student (trained once, like the released checkpoints the paper starts
from: their accuracies are single numbers); each seed re-draws everything VLsI draws (verbalizer
and LoRA init, batch order, layer matching). Within a seed every variant shares the ``vlsi``
run's step 1, since no variant changes verbalization. The SFT-only baseline and VLsI without step 3
come from the ``vlsi`` run itself.

Layout under ``root``: ``bases/`` (teacher and base student), ``s<seed>/<variant>/`` (one run
directory each, with its ``report.json``). A run whose ``report.json`` holds its accuracies is not
run again, so an interrupted ablation resumes where it stopped.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

import torch

from vlsi_ray.config import ConfigError, load_config
from vlsi_ray.data.synthetic import SCORED_TASKS
from vlsi_ray.prepare import has_own_shards, prepare_data
from vlsi_ray.recipe.layout import RunLayout
from vlsi_ray.runners.local import run_local


@dataclass(frozen=True)
class Variant:
    """One ablation run: ``overrides`` on the base config; ``evaluates`` is its run's ``eval_models``."""

    name: str
    overrides: tuple[str, ...] = ()
    evaluates: tuple[str, ...] = ("vlsi",)

    @property
    def baseline(self) -> bool:
        """Whether the run also trains the SFT-only baseline."""
        return "student_sft_only" in self.evaluates


_NO_BAND = ("matching.search_range=false", "matching.order_preservation=false")
_FIXED_T = ("matching.strategy=multinomial", "matching.temperature=fixed")
#: The default (paper) variant first: the others copy its step 1.
VARIANTS: tuple[Variant, ...] = (
    Variant("vlsi", (), ("student_sft_only", "vlsi_without_sft", "vlsi")),
    Variant("final_kd", ("loss.intermediate=none",)),
    Variant("random", ("matching.strategy=random",) + _NO_BAND),
    Variant("uniform", ("matching.strategy=uniform",) + _NO_BAND),
    Variant("bottom1", ("matching.strategy=bottom_k", "matching.bottom_k=1") + _NO_BAND),
    Variant("bottom3", ("matching.strategy=bottom_k", "matching.bottom_k=3") + _NO_BAND),
    Variant("multinomial", _FIXED_T + _NO_BAND),
    Variant("search_range", _FIXED_T + ("matching.order_preservation=false",)),
    Variant("order", _FIXED_T),
    Variant("inter_ce", ("loss.intermediate=ce",)),
    Variant("last_none", ("loss.last_layer=none",)),
    Variant("last_ce", ("loss.last_layer=ce",)),
)
VARIANT_NAMES = tuple(v.name for v in VARIANTS)
BASES = "bases"

#: Result tables: (row label, variant or ``bases``, evaluated model, the paper's MMBench score or None).
#: MMBench is the paper's first column of Table 4 (``../shared/VLSI_METHOD.md``); 4(d) gives no numbers.
TABLES: dict[str, list[tuple[str, str, str, float | None]]] = {
    "Table 4(b)/(c): what each step adds": [
        ("teacher", BASES, "teacher", None),
        ("student base (before any step)", BASES, "student_base", None),
        ("SFT only (same data and steps)", "vlsi", "student_sft_only", 81.8),
        ("final-layer KD + SFT", "final_kd", "vlsi", None),
        ("VLsI without step 3", "vlsi", "vlsi_without_sft", 82.1),
        ("VLsI", "vlsi", "vlsi", 86.3),
    ],
    "Table 4(e): layer matching (VLsI with step 3)": [
        ("random", "random", "vlsi", 77.0),
        ("uniform", "uniform", "vlsi", 79.5),
        ("bottom-1", "bottom1", "vlsi", 81.2),
        ("bottom-3", "bottom3", "vlsi", None),
        ("multinomial (fixed T)", "multinomial", "vlsi", 82.0),
        ("+ search range", "search_range", "vlsi", 83.5),
        ("+ order preservation", "order", "vlsi", 86.0),
        ("+ adaptive temperature (VLsI)", "vlsi", "vlsi", 86.3),
    ],
    "Table 4(d): step-2 losses (VLsI with step 3)": [
        ("intermediate KL + last KL (VLsI)", "vlsi", "vlsi", None),
        ("intermediate CE + last KL", "inter_ce", "vlsi", None),
        ("intermediate KL + last CE", "last_ce", "vlsi", None),
        ("intermediate KL, no last-layer term", "last_none", "vlsi", None),
    ],
}
BEGIN, END = "<!-- ablate:begin (written by jobs/ablate.py) -->", "<!-- ablate:end -->"


def markers(section: str | None = None) -> tuple[str, str]:
    """The begin/end markers of a generated block of RESULTS.md: the main tables (``section=None``) or a
    named section's (e.g. ``data-limited``), so that one file holds several regimes' tables."""
    if section is None:
        return BEGIN, END
    if not section or not all(c.isalnum() or c in "-_" for c in section):
        raise ValueError(f"section={section!r} must be a non-empty name of letters, digits, '-' and '_'; rename it.")
    return f"<!-- ablate[{section}]:begin (written by jobs/ablate.py) -->", f"<!-- ablate[{section}]:end -->"


def variants(names: Sequence[str] | None = None) -> list[Variant]:
    """The variants called ``names`` in :data:`VARIANTS` order (all when None); ``vlsi`` is always included."""
    if names is None:
        return list(VARIANTS)
    unknown = [n for n in names if n not in VARIANT_NAMES]
    if unknown:
        raise ValueError(f"unknown ablation variant {unknown[0]!r}; choose from {', '.join(VARIANT_NAMES)}.")
    return [v for v in VARIANTS if v.name in set(names) | {"vlsi"}]


def base_overrides(root: Path) -> list[str]:
    """Overrides every ablation run gets: the in-process runner, outputs under ``root``."""
    return ["runner=local", f"output_dir={root}"]


def bases_overrides(root: Path) -> list[str]:
    """The run that pretrains (or reuses from the model cache) the teacher and base student, and scores them."""
    return base_overrides(root) + [
        f"name={BASES}",
        "steps=[pretrain_teacher,pretrain_student]",
        "baseline_sft=false",
        "eval_models=[teacher,student_base]",
    ]


def variant_overrides(
    root: Path, variant: Variant, seed: int, with_bases: bool = True, teacher_path: str | None = None
) -> list[str]:
    """One variant's run: ``root/s<seed>/<variant>``, started from the pretrained bases, steps 1–3.

    ``teacher_path``: the base config's teacher checkpoint, when it names one (the bases run then
    pretrains only the student). ``with_bases=False`` leaves out the paths of the bases (to validate
    the overrides before they exist).
    """
    bases = root / BASES
    # The bases were pretrained on the synthetic task: with their paths set, it is asked for by name.
    paths = [
        f"teacher.path={teacher_path or bases / 'pretrain_teacher'}",
        f"student.path={bases / 'pretrain_student'}",
        "data.synthetic.generate=true",
    ]
    return [
        "runner=local",
        f"output_dir={root / f's{seed}'}",
        f"name={variant.name}",
        f"seed={seed}",
        *(paths if with_bases else []),
        "steps=[verbalize,interact,sft]",
        f"baseline_sft={str(variant.baseline).lower()}",
        f"eval_models=[{','.join(variant.evaluates)}]",
        *variant.overrides,
    ]


def limited_overrides(root: Path, train_rows: int) -> list[str]:
    """The data-limited regime: steps 1–3 see the first ``train_rows`` rows of the synthetic train split
    (the generator is sequential, so they are a prefix of the full split's rows; val and test are the
    same), generated once into ``root/data``. The bases still pretrain on the whole split."""
    return [f"data.dir={Path(root) / 'data'}", f"data.synthetic.train={train_rows}"]


def finished_accuracy(run_dir: Path, models: Iterable[str]) -> dict | None:
    """``report.json``'s accuracies when the run finished and scored every model in ``models``, else None."""
    path = RunLayout(run_dir).report_json
    if not path.is_file():
        return None
    accuracy = json.loads(path.read_text()).get("accuracy", {})
    return accuracy if all(m in accuracy for m in models) else None


def collect_finished(root: Path, seeds: Sequence[int], chosen: Sequence[Variant]) -> dict:
    """The accuracies of every finished run under ``root`` (``--report-only``): ``{run key: accuracy dict}``."""
    keys = [(BASES, ("teacher", "student_base"))] + [(f"s{s}/{v.name}", v.evaluates) for s in seeds for v in chosen]
    found = {key: finished_accuracy(Path(root) / key, models) for key, models in keys}
    return {key: acc for key, acc in found.items() if acc is not None}


def _worker_init(threads: int) -> None:
    torch.set_num_threads(threads)


def _run(config: str | None, overrides: list[str], log: str) -> dict:
    """Run one config in this (worker) process, output to ``log``; returns the report's accuracies."""
    cfg = load_config(config, overrides)
    with open(log, "a") as out, redirect_stdout(out), redirect_stderr(out):
        return run_local(cfg)["accuracy"]


def run_ablation(
    config: str | None,
    extra: Sequence[str],
    root: Path,
    seeds: Sequence[int],
    names: Sequence[str] | None = None,
    jobs: int = 2,
    threads: int = 1,
    say: Callable[[str], None] = print,
    train_rows: int | None = None,
) -> dict:
    """Run (or resume) every variant for every seed; returns ``{run key: accuracy dict}``.

    Run keys are ``bases`` and ``s<seed>/<variant>``. ``extra`` overrides go on every run (e.g.
    fewer steps); ``jobs`` runs go on at once, each with ``threads`` torch threads. ``train_rows``:
    the data-limited regime (:func:`limited_overrides`). Every config is loaded (and so validated)
    before the first run starts.
    """
    chosen = variants(names)
    root = Path(root)
    bases_cfg = bases_overrides(root) + list(extra)
    base = load_config(config, bases_cfg)  # also validates: a bad key fails before any work
    teacher = base.teacher.path
    extra = list(extra)
    if train_rows is not None:
        if has_own_shards(base.data.dir):
            raise ConfigError(
                f"train_rows limits the synthetic task's train split, but data.dir={base.data.dir} holds shards of its "
                "own; run the data-limited regime on the synthetic task (a data.dir without shards of its own)."
            )
        if not 1 <= train_rows <= base.data.synthetic.train:
            raise ConfigError(
                f"train_rows={train_rows} must be between 1 and data.synthetic.train={base.data.synthetic.train}; lower it."
            )
        extra += limited_overrides(root, train_rows)
    for variant in chosen:  # the bases do not exist yet: check the variant overrides without the paths
        load_config(config, variant_overrides(root, variant, seeds[0], with_bases=False) + extra)
    results: dict[str, dict] = {}
    started = time.perf_counter()

    def phase(todo: list[tuple[str, list[str], tuple[str, ...]]]) -> None:
        pending = []
        for key, overrides, models in todo:
            run_dir = root / key
            done = finished_accuracy(run_dir, models)
            if done is not None:
                results[key] = done
                say(f"[ablate] {key}: done before, reusing {run_dir / 'report.json'}")
            else:
                pending.append((key, overrides))
        if not pending:
            return
        with ProcessPoolExecutor(
            min(jobs, len(pending)), mp_context=get_context("spawn"), initializer=_worker_init, initargs=(threads,)
        ) as pool:
            futures = {}
            for key, overrides in pending:
                (root / key).mkdir(parents=True, exist_ok=True)
                futures[pool.submit(_run, config, overrides, str(root / key / "ablate.log"))] = key
                say(f"[ablate] {key}: started (log: {root / key / 'ablate.log'})")
            for future in as_completed(futures):
                key = futures[future]
                results[key] = future.result()
                scores = ", ".join(f"{m} {100 * a['overall']:.1f}%" for m, a in results[key].items())
                say(f"[ablate] {key}: finished after {_clock(time.perf_counter() - started)} total: {scores}")

    phase([(BASES, bases_cfg, ("teacher", "student_base"))])
    if train_rows is not None:  # generated here, once: the parallel runs would otherwise each write it
        limited = prepare_data(load_config(config, variant_overrides(root, chosen[0], seeds[0], with_bases=False) + extra))
        say(
            f"[ablate] data-limited regime: steps 1-3 on the first {train_rows} of {base.data.synthetic.train} train rows ({limited})"
        )
    default, others = chosen[0], chosen[1:]
    phase(
        [
            (f"s{s}/{default.name}", variant_overrides(root, default, s, teacher_path=teacher) + extra, default.evaluates)
            for s in seeds
        ]
    )
    todo = []
    for s in seeds:
        for variant in others:
            step1 = RunLayout(root / f"s{s}" / variant.name).stage_dir("verbalize")
            if not step1.exists():  # every variant of a seed shares the default run's step 1
                shutil.copytree(RunLayout(root / f"s{s}" / default.name).stage_dir("verbalize"), step1)
            todo.append(
                (f"s{s}/{variant.name}", variant_overrides(root, variant, s, teacher_path=teacher) + extra, variant.evaluates)
            )
    phase(todo)
    return results


def _clock(seconds: float) -> str:
    return f"{int(seconds // 60)}m{int(seconds % 60):02d}s"


# ---------------------------------------------------------------------------------------- tables
def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n - 1; 0 for a single value) of ``values``."""
    n = len(values)
    mean = sum(values) / n
    var = sum((v - mean) ** 2 for v in values) / (n - 1) if n > 1 else 0.0
    return mean, math.sqrt(var)


def collect(results: dict, seeds: Sequence[int], source: str, model: str) -> list[dict]:
    """The accuracy dicts of ``model`` in ``source``'s runs: one per seed, or the single ``bases`` run."""
    keys = [BASES] if source == BASES else [f"s{s}/{source}" for s in seeds]
    return [results[k][model] for k in keys if k in results and model in results[k]]


def summarize(results: dict, seeds: Sequence[int]) -> dict[str, list[dict]]:
    """Per table: rows with ``label``, ``n`` (runs), ``overall`` and ``per_task`` as (mean, std) in percent, ``paper``."""
    tables = {}
    for title, rows in TABLES.items():
        out = []
        for label, source, model, paper in rows:
            accs = collect(results, seeds, source, model)
            if not accs:
                continue
            per_task = {t: mean_std([100 * a["per_task"][t] for a in accs]) for t in SCORED_TASKS if t in accs[0]["per_task"]}
            out.append(
                dict(
                    label=label,
                    source=source,
                    n=len(accs),
                    overall=mean_std([100 * a["overall"] for a in accs]),
                    per_task=per_task,
                    paper=paper,
                )
            )
        tables[title] = out
    return tables


def ordering(rows: list[dict]) -> list[str]:
    """For consecutive rows that the paper scores, whether the tiny scale moves the same way, against its noise.

    A step counts as agreeing or disagreeing only when the difference of means exceeds the larger of
    the two standard deviations; otherwise it is within noise.
    """
    scored = [r for r in rows if r["paper"] is not None]
    lines = []
    for a, b in zip(scored, scored[1:]):
        paper_up = b["paper"] > a["paper"]
        diff = b["overall"][0] - a["overall"][0]
        noise = max(a["overall"][1], b["overall"][1])
        if abs(diff) <= noise:
            verdict = "within noise"
        else:
            verdict = "agrees" if (diff > 0) == paper_up else "disagrees"
        lines.append(
            f"{a['label']} → {b['label']}: paper {b['paper'] - a['paper']:+.1f}, here {diff:+.1f} (noise ±{noise:.1f}): {verdict}"
        )
    return lines


def _cell(ms: tuple[float, float], n: int) -> str:
    return f"{ms[0]:.1f}" if n == 1 else f"{ms[0]:.1f} ± {ms[1]:.1f}"


def render_tables(tables: dict[str, list[dict]], seeds: Sequence[int], command: str, section: str | None = None) -> str:
    """Markdown of :func:`summarize`'s tables with the ordering checks (the generated block of RESULTS.md
    between :func:`markers` of ``section``). A table with fewer than two finished rows is left out."""
    begin, end = markers(section)
    lines = [
        begin,
        "",
        f"Generated by `{command}` — seeds {', '.join(map(str, seeds))}; test accuracy in % "
        "(mean ± sample std over seeds; the teacher and base student are trained once).",
        "",
    ]
    for title, rows in tables.items():
        if len(rows) < 2:  # e.g. 4(e) of a run of a few variants: only VLsI's row, nothing to compare
            continue
        tasks = list(rows[0]["per_task"])
        lines += [
            f"### {title}",
            "",
            "| | overall | " + " | ".join(tasks) + " | runs | paper (MMB) |",
            "|---|---|" + "---|" * len(tasks) + "---|---|",
        ]
        for r in rows:
            cells = [_cell(r["overall"], r["n"])] + [_cell(r["per_task"][t], r["n"]) for t in tasks]
            paper = "" if r["paper"] is None else f"{r['paper']:.1f}"
            lines.append(f"| {r['label']} | " + " | ".join(cells) + f" | {r['n']} | {paper} |")
        checks = ordering(rows)
        if checks:
            lines += ["", "Steps the paper scores, in its order:", ""] + [f"- {c}" for c in checks]
        lines.append("")
    lines.append(end)
    return "\n".join(lines)


def check_markers(text: str, path: Path, section: str | None = None) -> None:
    """Raise ValueError unless ``text`` (the content of ``path``) holds both :func:`markers` of ``section``."""
    begin, end = markers(section)
    if begin not in text or end not in text:
        raise ValueError(f"{path} lacks the markers {begin!r} … {end!r}; add them where the tables go.")


def write_results(path: Path, block: str, section: str | None = None) -> None:
    """Put ``block`` between the :func:`markers` of ``section`` in ``path`` (created if missing), keeping the
    prose around them."""
    path = Path(path)
    begin, end = markers(section)
    text = (
        path.read_text() if path.is_file() else "# Results: the paper's ablations at tiny scale\n\n" + begin + "\n" + end + "\n"
    )
    check_markers(text, path, section)
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    path.write_text(head + block + tail)


def plot_tables(tables: dict[str, list[dict]], path: Path) -> Path:
    """Bar charts (mean ± std overall accuracy) of every table, one panel each, as a PNG."""
    import matplotlib  # noqa: PLC0415 - pyplot, Agg backend, only when a plot is drawn

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415 - pyplot, Agg backend, only when a plot is drawn

    shown = {t: rows for t, rows in tables.items() if len(rows) >= 2}  # as in render_tables
    fig, axes = plt.subplots(1, len(shown), figsize=(5.5 * len(shown), 4.5), squeeze=False)
    for ax, (title, rows) in zip(axes[0], shown.items()):
        means = [r["overall"][0] for r in rows]
        stds = [r["overall"][1] for r in rows]
        ax.bar(range(len(rows)), means, yerr=stds, capsize=3, color="tab:blue")
        ax.set_xticks(range(len(rows)), [r["label"] for r in rows], rotation=60, ha="right", fontsize=8)
        ax.set_ylim(max(0.0, min(means) - 10), max(m + s for m, s in zip(means, stds)) + 3)
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
