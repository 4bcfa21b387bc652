"""Reproduce the paper's ablations (Table 4(b)/(c), 4(d), 4(e)) at tiny scale and write docs/RESULTS.md.

    python jobs/ablate.py                       # 12 variants × seeds 0 1 2 on conf/tiny.yaml
    python jobs/ablate.py --seeds 0 --variants vlsi random uniform
    python jobs/ablate.py --report-only         # re-write the tables from the finished runs

Runs go to ``runs/ablate/`` (``bases/`` once, then ``s<seed>/<variant>/``); re-running the same
command skips finished runs, so an interrupted ablation resumes. ``--jobs`` runs go on at once
(default 2, one torch thread each: tiny models run faster as two single-threaded processes than as
one with two threads). Trailing ``key=value`` overrides go on every run. The tables land between
the markers of ``--out`` (default docs/RESULTS.md); the text around them is kept, and
``--plot`` (default docs/results.png) gets bar charts of the same numbers.
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
    collect_finished,
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
    parser.add_argument("--report-only", action="store_true", help="do not run anything: tabulate the finished runs")
    parser.add_argument("overrides", nargs="*", help="key=value overrides for every run, e.g. stages.interact.max_steps=100")
    args = parser.parse_args(argv)
    if args.jobs < 1 or args.threads < 1:
        parser.error("--jobs and --threads must be at least 1")
    root = Path(args.root)
    try:
        if args.report_only:
            results = collect_finished(root, args.seeds, variants(args.variants))
        else:
            results = run_ablation(args.config, args.overrides, root, args.seeds, args.variants, args.jobs, args.threads)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    tables = summarize(results, args.seeds)
    command = "python jobs/ablate.py " + shlex.join(
        (["--seeds", *map(str, args.seeds)]) + (["--variants", *args.variants] if args.variants else []) + list(args.overrides)
    )
    write_results(Path(args.out), render_tables(tables, args.seeds, command))
    plot_tables(tables, Path(args.plot))
    print(f"[ablate] tables in {args.out}, chart in {args.plot}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
