"""Run VLsI distillation: tiny-model pretraining, verbalization, interaction, SFT, and a report.

CPU-tiny (the embedded default, a few minutes on a laptop CPU; generates its own data):

    python jobs/distill.py

Options: ``--config conf/X.yaml`` and any number of ``key=value`` overrides, e.g.

    python jobs/distill.py name=try1 steps=[verbalize,interact,sft] matching.strategy=uniform

Outputs go to ``<output_dir>/<name>/`` (``runs/tiny`` by default): checkpoints per stage,
``metrics.jsonl``, ``report.md``/``report.json`` and PNG plots. Re-running the same command skips
finished stages.

``--dry-run`` checks a run in seconds without loading a weight or writing anything: both models'
configs, tokenizers and processors, the pair, the data's metadata and the token lengths of a sample
of rows, the stage plan and the placement (see ``vlsi_ray.dry_run``):

    python jobs/distill.py --config conf/qwen2vl_72b_to_7b.yaml --dry-run teacher.path=... student.path=...
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # so `ray job submit --working-dir .` and a plain checkout both import vlsi_ray

from vlsi_ray.env import set_offline_defaults  # noqa: E402

set_offline_defaults()

from vlsi_ray.config import ConfigError, load_config  # noqa: E402
from vlsi_ray.dry_run import dry_run  # noqa: E402
from vlsi_ray.prepare import require_data  # noqa: E402
from vlsi_ray.runners.local import run_local  # noqa: E402
from vlsi_ray.runners.ray.driver import run_ray  # noqa: E402
from vlsi_ray.teacher.cache import require_cache  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "conf" / "tiny.yaml"), help="YAML config (default: conf/tiny.yaml)")
    parser.add_argument("--dry-run", action="store_true", help="check models, pair and data and print the plan, then exit")
    parser.add_argument("--dry-run-rows", type=int, default=256, help="train rows whose token lengths the dry run measures")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. seed=1 stages.sft.max_steps=50")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        if args.dry_run:
            dry_run(cfg, args.dry_run_rows)
            return 0

        require_data(cfg)  # shards, or the synthetic task asked for: before any work
        require_cache(cfg)  # teacher.source=cache: the cache must exist before any work
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    except (ValueError, FileNotFoundError) as err:  # the dry run's findings: an incompatible pair, a missing checkpoint
        if not args.dry_run:
            raise
        print(f"dry run: {err}", file=sys.stderr)
        return 2
    if cfg.runner == "local":
        run_local(cfg)
    else:
        run_ray(cfg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
