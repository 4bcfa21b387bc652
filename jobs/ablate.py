"""Reproduce the paper's ablations (Table 4(b)/(c), 4(d), 4(e)) at tiny scale and write docs/RESULTS.md.

    python jobs/ablate.py                       # 12 variants × seeds 0 1 2 on conf/tiny.yaml
    python jobs/ablate.py --seeds 0 --variants vlsi random uniform
    python jobs/ablate.py --report-only         # re-write the tables from the finished runs
    python jobs/ablate.py --root runs/ablate_limited --train-rows 3000 --section data-limited \
        --plot docs/results_limited.png --variants final_kd   # the data-limited regime

Runs go to ``runs/ablate/`` (``bases/`` once, then ``s<seed>/<variant>/``); re-running the same
command skips finished runs, so an interrupted ablation resumes. ``--jobs`` runs go on at once
(default 2, one torch thread each: tiny models run faster as two single-threaded processes than as
one with two threads). ``key=value`` overrides go on every run (put them before ``--seeds`` and
``--variants``, which would read them as more of theirs). The tables land between
the markers of ``--out`` (default docs/RESULTS.md); the text around them is kept, and
``--plot`` (default docs/results.png) gets bar charts of the same numbers. ``--train-rows N`` is the
data-limited regime: steps 1–3 see only the first N rows of the synthetic train split (the bases
still pretrain on all of it); ``--section NAME`` writes its tables between their own markers
(``<!-- ablate[NAME]:begin … -->``), beside the main ones.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from vlsi_ray.env import set_offline_defaults  # noqa: E402

set_offline_defaults()

from vlsi_ray.ablation import (  # noqa: E402
    VARIANT_NAMES,
    check_markers,
    collect_finished,
    markers,
    plot_tables,
    render_tables,
    run_ablation,
    summarize,
    variants,
    write_results,
)
from vlsi_ray.config import ConfigError  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "conf" / "tiny.yaml"), help="base config (default: conf/tiny.yaml)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument(
        "--variants", nargs="+", choices=VARIANT_NAMES, help="a subset (vlsi always runs: the others reuse its step 1)"
    )
    parser.add_argument("--root", default="runs/ablate", help="where the runs go (default: runs/ablate)")
    parser.add_argument("--jobs", type=int, default=2, help="runs at once (default 2)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run (default 1)")
    parser.add_argument("--out", default=str(ROOT / "docs" / "RESULTS.md"), help="markdown file whose tables are rewritten")
    parser.add_argument("--plot", default=str(ROOT / "docs" / "results.png"), help="bar-chart PNG of the tables")
    parser.add_argument(
        "--train-rows", type=int, help="the data-limited regime: steps 1-3 on the first N synthetic train rows (bases: all)"
    )
    parser.add_argument("--section", help="write the tables between the markers of this named section of --out")
    parser.add_argument("--report-only", action="store_true", help="do not run anything: tabulate the finished runs")
    parser.add_argument("overrides", nargs="*", help="key=value overrides for every run, e.g. stages.interact.max_steps=100")
    args = parser.parse_args(argv)
    if args.jobs < 1 or args.threads < 1:
        parser.error("--jobs and --threads must be at least 1")
    out = Path(args.out)
    try:  # before any run: the tables must have somewhere to go (a missing file is created with them)
        markers(args.section)
        if out.is_file():
            check_markers(out.read_text(), out, args.section)
    except ValueError as err:
        parser.error(str(err))
    root = Path(args.root)
    try:
        if args.report_only:
            results = collect_finished(root, args.seeds, variants(args.variants))
        else:
            results = run_ablation(
                args.config, args.overrides, root, args.seeds, args.variants, args.jobs, args.threads, train_rows=args.train_rows
            )
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    tables = summarize(results, args.seeds)
    options = ["--seeds", *map(str, args.seeds)] + (["--variants", *args.variants] if args.variants else [])
    if args.root != "runs/ablate":
        options = ["--root", args.root] + options
    if args.train_rows is not None:
        options += ["--train-rows", str(args.train_rows)]
    if args.section:
        options += ["--section", args.section]
    # The overrides first: after --seeds or --variants (nargs="+") they would be read as more of those.
    command = "python jobs/ablate.py " + shlex.join(list(args.overrides) + options)
    write_results(Path(args.out), render_tables(tables, args.seeds, command, args.section), args.section)
    plot_tables(tables, Path(args.plot))
    print(f"[ablate] tables in {args.out}, chart in {args.plot}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
