"""Write a tiny teacher/student pair laid out exactly as a family's released checkpoints are on the Hub.

Random-init tiny models (tiny.yaml's sizes), bfloat16 safetensors shards with an index, the 4.x weight
names and config.json keys, the released chat template, tokenizer and processor files, no project
marker: the real loading path (``teacher.path`` / ``student.path``) on any machine, offline, in seconds.

    python jobs/hub_checkpoints.py --out /tmp/hub --family qwen2_vl      # /tmp/hub/qwen2_vl/{teacher,student}
    python jobs/distill.py --dry-run teacher.path=/tmp/hub/qwen2_vl/teacher student.path=/tmp/hub/qwen2_vl/student
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from vlsi_ray.env import set_offline_defaults  # noqa: E402

set_offline_defaults()

import torch  # noqa: E402

from vlsi_ray.config import load_config  # noqa: E402
from vlsi_ray.data.synthetic import corpus_texts, generate_rows  # noqa: E402
from vlsi_ray.models.families import FAMILIES  # noqa: E402
from vlsi_ray.models.hub_layout import write_hub_checkpoint  # noqa: E402
from vlsi_ray.models.tokenizer import train_tokenizer  # noqa: E402
from vlsi_ray.prepare import build_model  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="directory to write <family>/teacher and <family>/student into")
    parser.add_argument("--family", choices=list(FAMILIES), nargs="+", default=list(FAMILIES))
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    args = parser.parse_args(argv)

    texts = corpus_texts(generate_rows("train", 400, seed=0))
    for family in args.family:
        cfg = load_config(
            ROOT / "conf" / "tiny.yaml", ["teacher.path=null", f"teacher.family={family}", f"student.family={family}"]
        )
        tokenizer = train_tokenizer(texts, family, cfg.data.synthetic.tokenizer_vocab_size)
        for role in ("teacher", "student"):
            out = write_hub_checkpoint(
                build_model(cfg, role, tokenizer, torch.device("cpu")),
                Path(args.out) / family / role,
                dtype=getattr(torch, args.dtype),
            )
            print(f"[hub] {family} {role} -> {out} ({sum(f.stat().st_size for f in out.iterdir()) / 2**20:.1f} MiB)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
