"""A finished run directory with tiny untrained models, laid out as the runners write it; and a trained one.

Export, serving, evaluation and trace tests need a run to read, not a trained one: this builds the
data, the tokenizer and tiny teacher/student models (random init, so greedy outputs are varied) and
writes them where a run puts them — ``pretrain_teacher/``, ``verbalize/teacher_verbalizers``,
``interact/student_verbalizers``, ``sft/student`` — with the stage markers. Verb-FFNs get random
down projections so that every layer verbalizes something different.

:func:`make_e2e_run` is the trained one: every step on the paper's default matching, bad rows planted.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from types import SimpleNamespace

import torch

from vlsi_ray.config import load_config, to_yaml
from vlsi_ray.data.shards import write_shards
from vlsi_ray.data.synthetic import generate_rows
from vlsi_ray.prepare import build_model, new_verbalizers, prepare_data, tiny_tokenizer
from vlsi_ray.recipe.layout import RunLayout
from vlsi_ray.runners.local import run_local

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


#: Rows planted in the end-to-end run's data, by split: each is left out of the run and counted in its
#: report's ``skipped_rows`` (reasons: vlsi_ray.data.shards.validate_row and the index's length check).
PLANTED = {
    "train": ("planted/truncated-png", "planted/not-an-image", "planted/no-assistant", "planted/over-long"),
    "test": ("planted/bad-json", "planted/two-images-one-part"),
}


def plant_bad_rows(data_dir: Path, seed: int) -> dict[str, tuple[str, ...]]:
    """Add one extra shard per split of :data:`PLANTED` to a generated dataset (the generator's manifest
    still matches, so the run reuses it and reads the extra shards with the others); returns PLANTED."""
    rows = generate_rows("train", 6, seed + 1000)
    user = json.loads(rows[2]["messages"])[:1]
    long = json.loads(rows[3]["messages"])
    long[-1]["content"] = [{"type": "text", "text": " ".join(["red"] * 2000)}]
    damaged = {
        "planted/truncated-png": dict(rows[0], images=[rows[0]["images"][0][: len(rows[0]["images"][0]) // 2]]),
        "planted/not-an-image": dict(rows[1], images=[b"not a png"]),
        "planted/no-assistant": dict(rows[2], messages=json.dumps(user)),
        "planted/over-long": dict(rows[3], messages=json.dumps(long)),
        "planted/bad-json": dict(rows[4], messages="[{not json", split="test"),
        "planted/two-images-one-part": dict(rows[5], images=rows[5]["images"] * 2, split="test"),
    }
    for split, ids in PLANTED.items():
        staging = data_dir / f"planted-{split}"
        (path,) = write_shards([dict(damaged[i], id=i) for i in ids], staging, split)
        path.rename(data_dir / f"{split}-99999.parquet")  # after the generated shards, read with them
        staging.rmdir()
    return PLANTED


def e2e_overrides(tmp: Path) -> list[str]:
    """The end-to-end run's overrides: the tiny setting (tiny_config.py) on the default matching."""
    return [o for o in make_tiny_overrides(tmp, "e2e") if not o.startswith("matching.strategy=")]


def make_e2e_run(tmp: Path) -> SimpleNamespace:
    """Every step and the SFT-only baseline, in process, on the tiny setting with the paper's default
    (multinomial) matching and :data:`PLANTED` bad rows; returns ``cfg``, ``report`` and ``seconds``."""
    cfg = load_config(None, e2e_overrides(tmp))
    assert cfg.matching.strategy == "multinomial"
    prepare_data(cfg)
    plant_bad_rows(Path(cfg.data.dir), cfg.data.synthetic.seed)
    started = time.perf_counter()
    report = run_local(cfg)
    return SimpleNamespace(cfg=cfg, report=report, seconds=time.perf_counter() - started)
