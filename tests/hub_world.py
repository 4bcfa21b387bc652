"""Checkpoints stored the way released ones are: a tiny teacher/student pair per family, bfloat16, in
the Hub's layout (:mod:`vlsi_ray.models.hub_layout`), beside small synthetic shards.

Every run over such a pair loads it through ``teacher.path`` / ``student.path`` exactly as a user's
Qwen2-VL-72B / 7B would be loaded; the models are random-init tiny ones (what is under test is the
path, not what they know).
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import torch

from vlsi_ray.config import load_config
from vlsi_ray.models.hub_layout import write_hub_checkpoint
from vlsi_ray.prepare import build_model, prepare_data, tiny_tokenizer

from tiny_config import make_tiny_overrides

#: Rows per split of the shards beside the pairs (the synthetic task, asked for explicitly: with checkpoint
#: paths set a run would otherwise refuse a data.dir without shards of its own).
HUB_DATA = ["data.synthetic.train=64", "data.synthetic.val=8", "data.synthetic.test=16", "data.synthetic.generate=true"]
#: Optimizer steps per stage of a run over a pair: enough to see every stage train and finish.
HUB_STEPS = {"verbalize": 3, "interact": 3, "sft": 3}


def make_hub_world(tmp: Path, family: str) -> SimpleNamespace:
    """Data, the family's tokenizer, and a bfloat16 teacher/student pair in the Hub layout under ``tmp``.

    Returns ``teacher`` and ``student`` (checkpoint dirs), ``data`` (the shards), ``family`` and
    ``overrides(name, *extra)``: a run over the pair (steps 1-3 and the SFT-only baseline, few steps).
    """
    base = make_tiny_overrides(tmp, "hub-build") + HUB_DATA + [f"teacher.family={family}", f"student.family={family}"]
    cfg = load_config(None, base)
    prepare_data(cfg)
    tokenizer = tiny_tokenizer(cfg)
    dirs = {}
    for role in ("teacher", "student"):
        backbone = build_model(cfg, role, tokenizer, torch.device("cpu"))
        dirs[role] = write_hub_checkpoint(backbone, tmp / "hub" / role, dtype=torch.bfloat16)

    def overrides(name: str, *extra: str) -> list[str]:
        out = make_tiny_overrides(tmp, name, HUB_STEPS) + HUB_DATA
        return out + [
            f"teacher.path={dirs['teacher']}",
            f"student.path={dirs['student']}",
            "steps=[verbalize,interact,sft]",
            *extra,
        ]

    return SimpleNamespace(
        family=family,
        teacher=dirs["teacher"],
        student=dirs["student"],
        data=tmp / "data",
        tokenizer=tokenizer,
        overrides=overrides,
    )
