"""A finished run directory with tiny untrained models, laid out as the runners write it.

Export, serving, evaluation and trace tests need a run to read, not a trained one: this builds the
data, the tokenizer and tiny teacher/student models (random init, so greedy outputs are varied) and
writes them where a run puts them — ``pretrain_teacher/``, ``verbalize/teacher_verbalizers``,
``interact/student_verbalizers``, ``sft/student`` — with the stage markers. Verb-FFNs get random
down projections so that every layer verbalizes something different.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from vlsi_ray.config import load_config, to_yaml
from vlsi_ray.prepare import build_model, new_verbalizers, prepare_data, tiny_tokenizer
from vlsi_ray.recipe.layout import RunLayout

from tiny_config import make_tiny_overrides


def make_tiny_run(tmp: Path, name: str = "served") -> Path:
    """Write a finished tiny run under ``tmp`` and return its run directory."""
    cfg = load_config(None, make_tiny_overrides(tmp, name) + ["data.synthetic.train=200", "data.synthetic.test=40"])
    prepare_data(cfg)
    tokenizer = tiny_tokenizer(cfg)
    layout = RunLayout(cfg.run_dir)
    layout.root.mkdir(parents=True, exist_ok=True)
    layout.config.write_text(to_yaml(cfg))
    for role, stage, verbs_dir in (
        ("teacher", "pretrain_teacher", layout.verbalizers("teacher")),
        ("student", "sft", layout.verbalizers("student", "interact")),
    ):
        backbone = build_model(cfg, role, tokenizer, torch.device("cpu"))
        backbone.save_pretrained(layout.model(stage))
        verbs = new_verbalizers(cfg, role, backbone, seed=7)
        with torch.no_grad():
            for ffn in verbs.ffns.values():
                torch.nn.init.normal_(ffn.down.weight, std=0.5 / backbone.hidden_size**0.5)
        verbs.save(verbs_dir)
    for stage in ("pretrain_teacher", "sft", "verbalize", "interact"):
        layout.marker(stage).write_text(json.dumps({"stage": stage, "steps": 0, "seconds": 0.0}))
    return layout.root
