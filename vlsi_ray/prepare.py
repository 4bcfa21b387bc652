"""Everything a run needs before training: the data splits, the tokenizer, the teacher and the student.

Shared by every runner. Tiny models (no ``path`` in the config) get a BPE tokenizer trained
offline on the synthetic corpus and cached next to the shards; real checkpoints load from local
directories only, and the pair is checked for a shared vocabulary before anything trains.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch

from vlsi_ray.config import ModelConfig, RunConfig
from vlsi_ray.data.collate import ChatCollator
from vlsi_ray.data.shards import MANIFEST, ReadStats, generate_dataset, read_rows
from vlsi_ray.data.synthetic import corpus_texts
from vlsi_ray.models import qwen2_vl, llava_onevision
from vlsi_ray.models.backbone import Backbone, ModelInfo, check_compatible
from vlsi_ray.models.tokenizer import train_tokenizer
from vlsi_ray.models.verbalizer import Verbalizers

TINY_BUILDERS = {"qwen2_vl": qwen2_vl.build_tiny, "llava_onevision": llava_onevision.build_tiny}
TOKENIZER_DIR = "tokenizer"


@dataclass
class Splits:
    """Validated rows of each split and what reading them skipped."""

    train: list[dict]
    val: list[dict]
    test: list[dict]
    stats: dict[str, ReadStats]


def resolve_device(name: str) -> torch.device:
    """``auto`` → CUDA when available, else CPU; otherwise the named device."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device={name} was requested but CUDA is not available here; use device=auto or device=cpu.")
    return torch.device(name)


def prepare_data(cfg: RunConfig) -> Splits:
    """Generate the synthetic shards if ``data.dir`` has none, then read and validate each split."""
    data_dir = Path(cfg.data.dir)
    user_shards = any(data_dir.glob("*.parquet")) and not (data_dir / MANIFEST).is_file()
    if not user_shards:  # the synthetic task: (re)generated unless its manifest matches the config
        syn = cfg.data.synthetic
        generate_dataset(
            data_dir,
            {"train": syn.train, "val": syn.val, "test": syn.test},
            seed=syn.seed,
            **syn.generator_kwargs(),
        )
    rows, stats = {}, {}
    for split in ("train", "val", "test"):
        rows[split], stats[split] = read_rows(data_dir, split=split, on_error=cfg.data.on_error)
        skipped = f", skipped {stats[split].skipped} bad rows" if stats[split].skipped else ""
        print(f"[data] {split}: {stats[split].kept} rows{skipped}", flush=True)
    return Splits(rows["train"], rows["val"], rows["test"], stats)


def tiny_tokenizer(cfg: RunConfig, train_rows: list[dict]):
    """The offline-trained tokenizer for tiny models, cached in ``<data.dir>/tokenizer`` by corpus."""
    from transformers import AutoTokenizer

    texts = corpus_texts(train_rows)
    size = cfg.data.synthetic.tokenizer_vocab_size
    key = hashlib.sha256(json.dumps([sorted(set(texts)), size]).encode()).hexdigest()[:12]
    path = Path(cfg.data.dir) / TOKENIZER_DIR / f"{cfg.student.family}-{key}"
    if (path / "tokenizer.json").is_file():
        return AutoTokenizer.from_pretrained(str(path))
    tokenizer = train_tokenizer(texts, cfg.student.family, size)
    tokenizer.save_pretrained(str(path))
    return tokenizer


def build_model(model: ModelConfig, role: str, tokenizer, device: torch.device) -> Backbone:
    """Load ``model.path`` (local directory) or build the tiny model for ``role`` with ``tokenizer``."""
    if model.path is not None:
        return Backbone.from_pretrained(model.path, device=device)
    backbone = TINY_BUILDERS[model.family](role, tokenizer, **asdict(model.tiny))
    backbone.model.to(device)
    return backbone


def model_key(model: ModelConfig, *parts) -> str:
    """Short stable hash of a model config plus anything else that decides its trained weights."""
    weights = {f.name for f in fields(ModelConfig)}  # a teacher's signal source does not change its weights
    blob = json.dumps([{k: v for k, v in asdict(model).items() if k in weights}, *parts], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def make_collator(backbone: Backbone, cfg: RunConfig) -> ChatCollator:
    """The single collate path shared by teacher, student, training and evaluation."""
    return ChatCollator(backbone.tokenizer, backbone.image_processor, backbone.family, cfg.data.max_length)


def check_pair(teacher: Backbone | ModelInfo, student: Backbone | ModelInfo) -> int:
    """Refuse incompatible models; return the shared vocabulary size (the KL's support)."""
    check_compatible(teacher, student)
    return min(teacher.vocab_size, student.vocab_size)


def check_pair_paths(teacher_dir: str | Path, student_dir: str | Path) -> int:
    """:func:`check_pair` on two checkpoint directories without loading their weights."""
    return check_pair(ModelInfo.from_pretrained(teacher_dir), ModelInfo.from_pretrained(student_dir))


def new_verbalizers(cfg: RunConfig, role: str, backbone: Backbone, seed: int) -> Verbalizers:
    """Freshly initialised verb-FFNs at ``role``'s target layers (on the backbone's device).

    Initialised from ``seed`` alone (the global RNG is left untouched), so every runner and every
    process draws the same weights.
    """
    v = cfg.verbalizer
    layers = getattr(cfg, role).targets.resolve(backbone.num_layers)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        verbs = Verbalizers(backbone.hidden_size, layers, v.residual, v.zero_init, v.final_norm)
    return verbs.to(backbone.lm_head.weight.device)  # next to the heads they feed (the last GPU of a spread model)
