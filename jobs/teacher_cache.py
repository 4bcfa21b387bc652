"""Compute the teacher's step-2 signal once and store it: the offline teacher cache.

    python jobs/distill.py steps=[pretrain_teacher,pretrain_student,verbalize]   # the teacher and its verbalizers
    python jobs/teacher_cache.py                                                  # -> runs/tiny/teacher_cache
    python jobs/distill.py teacher.source=cache                                   # step 2 (and 3) from the cache

Takes the same ``--config`` and ``key=value`` overrides as ``jobs/distill.py`` (the run name says
whose teacher and verbalizers to use; ``teacher.cache_dir`` where to write). Ray Data reads the
train shards; ``teacher_pool.replicas`` teacher actors (``teacher_pool.resources`` each) compute
top-``signal.topk`` + tail (+ ``signal.tail_samples``) for every teacher target layer and the final
layer; the rows land as Parquet, keyed by sample id, with a manifest recording the teacher, its
verbalizers, k, the tail samples and the data. Runs on an existing Ray cluster (``RAY_ADDRESS``,
``ray.address``) or a local one, like ``jobs/distill.py``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from vlsi_ray.env import set_offline_defaults  # noqa: E402

set_offline_defaults()

from vlsi_ray.config import ConfigError, load_config  # noqa: E402
from vlsi_ray.runners.ray.driver import connect  # noqa: E402
from vlsi_ray.teacher.cache import build_cache, step2_inputs  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "conf" / "tiny.yaml"), help="YAML config (default: conf/tiny.yaml)")
    parser.add_argument("--overwrite", action="store_true", help="rebuild even when a matching cache exists")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, as for jobs/distill.py")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)

        step2_inputs(cfg)  # the teacher and its verbalizers must exist before Ray starts
    except (ConfigError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

    connect(cfg)
    build_cache(cfg, overwrite=args.overwrite)
    return 0


if __name__ == "__main__":
    sys.exit(main())
