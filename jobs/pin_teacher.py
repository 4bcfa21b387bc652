"""Pin the tiny teacher a finished run pretrained: copy it into the repository with MANIFEST.json.

    # 1. pretrain and score the teacher: conf/tiny.yaml's settings with teacher.path=null (~45 min on one core)
    python jobs/distill.py runner=local name=tiny-teacher data.dir=data/tiny-teacher teacher.path=null \
        "steps=[pretrain_teacher]" "eval_models=[teacher]" baseline_sft=false data.synthetic.train=60000
    # 2. pin it (this is what conf/models/tiny-teacher/MANIFEST.json records)
    python jobs/pin_teacher.py runs/tiny-teacher conf/models/tiny-teacher --command "<command 1>"
    # or as released checkpoints are written: bfloat16, sharded, the Hub's layout
    python jobs/pin_teacher.py runs/tiny-teacher pinned/tiny-teacher-bf16 --command "<command 1>" --dtype bfloat16

The manifest names the command, the config that decided the weights (model, optimisation, seed), the
data generator and a fingerprint of the train shards, the weights' SHA-256 (each shard's, when
sharded) and the run's test accuracy per task type; runs that load the directory check the weights
against it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from vlsi_ray.models.pinned import PinnedCheckpointError, describe, pin_checkpoint  # noqa: E402
from vlsi_ray.models.precision import parse_dtype  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", help="the finished run (its config.yaml, report.json and pretrain_<role>/)")
    parser.add_argument("out", help="where the pinned checkpoint goes (replaced)")
    parser.add_argument("--command", required=True, help="the command line that produced the run (recorded)")
    parser.add_argument("--role", default="teacher", choices=["teacher", "student"])
    parser.add_argument(
        "--dtype",
        choices=["bfloat16", "float16"],
        help="write the weights cast and sharded in the Hub's layout (default: as trained)",
    )
    parser.add_argument("--shards", type=int, default=3, help="with --dtype: about this many safetensors files (default 3)")
    args = parser.parse_args(argv)
    if args.shards < 1:
        parser.error("--shards must be at least 1")
    try:
        dtype = None if args.dtype is None else parse_dtype(args.dtype)
        manifest = pin_checkpoint(args.run_dir, args.out, args.command, args.role, dtype=dtype, shards=args.shards)
    except (PinnedCheckpointError, OSError, KeyError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"[pin] {args.out}: {describe(manifest)}", flush=True)
    print(json.dumps({k: manifest[k] for k in ("weights_sha256", "data")}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
