"""Run VLsI distillation: tiny-model pretraining, verbalization, interaction, SFT, and a report.

CPU-tiny (the embedded default, a few minutes on a laptop CPU; generates its own data):

    python jobs/distill.py

Options: ``--config conf/X.yaml`` and any number of ``key=value`` overrides, e.g.

    python jobs/distill.py name=try1 steps=[verbalize,interact,sft] matching.strategy=uniform

Outputs go to ``<output_dir>/<name>/`` (``runs/tiny`` by default): checkpoints per stage,
``metrics.jsonl``, ``report.md``/``report.json`` and PNG plots. Re-running the same command skips
finished stages.
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "conf" / "tiny.yaml"), help="YAML config (default: conf/tiny.yaml)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. seed=1 stages.sft.max_steps=50")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        from vlsi_ray.teacher_cache import require_cache

        require_cache(cfg)  # teacher.source=cache: the cache must exist before any work
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    if cfg.runner == "local":
        from vlsi_ray.runner import run_local

        run_local(cfg)
    else:
        from vlsi_ray.ray_runner import run_ray

        run_ray(cfg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
