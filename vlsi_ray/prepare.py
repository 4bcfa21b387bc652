"""Everything a run needs before training: the data and its index, the tokenizer, the teacher and the student.

Shared by every runner. Tiny models (no ``path`` in the config) get a BPE tokenizer trained
offline on the synthetic corpus and cached next to the shards; real checkpoints load from local
directories only, and the pair is checked for a shared vocabulary before anything trains.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from vlsi_ray.config import ConfigError, ModelConfig, RunConfig
from vlsi_ray.data.collate import ChatCollator
from vlsi_ray.data.fingerprint import processor_fingerprint
from vlsi_ray.data.index import SplitIndex, needs_measuring, read_index
from vlsi_ray.data.shards import SPLITS, generate_dataset, load_manifest, read_rows, shard_files
from vlsi_ray.data.synthetic import corpus_texts
from vlsi_ray.models.backbone import Backbone, ModelInfo, check_compatible, saved_dtype
from vlsi_ray.models.families import get_family
from vlsi_ray.models.precision import compute_dtype
from vlsi_ray.models.tokenizer import train_tokenizer
from vlsi_ray.models.verbalizer import Verbalizers

TOKENIZER_DIR = "tokenizer"


@dataclass(frozen=True)
class LoadSettings:
    """How a run loads one of its models (picklable: Ray actors and workers get it with the path).

    ``role`` names the config section (``teacher``/``student``) in error messages; ``dtype`` the
    compute dtype (``auto``: see :func:`vlsi_ray.models.precision.compute_dtype`); the image
    resolution applies to the teacher's and the student's processors alike.
    """

    role: str = "student"
    dtype: str = "auto"
    attn_implementation: str = "sdpa"
    gradient_checkpointing: bool = False
    min_pixels: int | None = None
    max_pixels: int | None = None

    @classmethod
    def of(cls, cfg: RunConfig, role: str) -> LoadSettings:
        """``cfg``'s settings for ``role`` (``teacher`` or ``student``)."""
        model = getattr(cfg, role)
        return cls(
            role,
            model.dtype,
            model.attn_implementation,
            model.gradient_checkpointing,
            cfg.images.min_pixels,
            cfg.images.max_pixels,
        )

    def apply(self, backbone: Backbone) -> Backbone:
        """Gradient checkpointing and the image resolution, on a loaded or built backbone (in place)."""
        backbone.set_gradient_checkpointing(self.gradient_checkpointing)
        apply_resolution(backbone, self.min_pixels, self.max_pixels)
        return backbone


def apply_resolution(model: Backbone | ModelInfo, min_pixels: int | None, max_pixels: int | None) -> None:
    """``images.min_pixels``/``max_pixels`` on ``model``'s image processor (in place; None keeps its own)."""
    if min_pixels is None and max_pixels is None:
        return
    try:
        model.spec.set_resolution(model.image_processor, min_pixels, max_pixels)
    except ValueError as err:
        raise ConfigError(f"{model.name}: {err}") from None


def load_model(
    path: str | Path,
    settings: LoadSettings,
    device: torch.device | str | None,
    device_map: str | None = None,
    tensor_parallel: int = 1,
) -> Backbone:
    """Load the checkpoint at ``path`` as ``settings`` say: compute dtype, attention kernel,
    gradient checkpointing, image resolution; on ``device`` (or spread by ``device_map``, or this
    rank's shard of a ``tensor_parallel`` group: :meth:`Backbone.from_pretrained`)."""
    attention = attention_kernel(settings)
    where = device if device is not None else ("cuda" if device_map is not None else "cpu")
    dtype = compute_dtype(settings.dtype, where, saved_dtype(path))
    backbone = Backbone.from_pretrained(
        path, device=device, dtype=dtype, device_map=device_map, attn_implementation=attention, tensor_parallel=tensor_parallel
    )
    return settings.apply(backbone)


def attention_kernel(settings: LoadSettings) -> str:
    """``<role>.attn_implementation`` for this process: ``auto`` is flash_attention_2 where CUDA and the
    flash-attn package are present, else sdpa; an explicit flash_attention_2 without them is refused."""
    available = torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None
    if settings.attn_implementation == "auto":
        return "flash_attention_2" if available else "sdpa"
    if settings.attn_implementation == "flash_attention_2" and not available:
        raise ConfigError(
            f"{settings.role}.attn_implementation=flash_attention_2 needs CUDA and the flash-attn package "
            f"where the {settings.role} runs; install flash-attn there, or use auto or sdpa."
        )
    return settings.attn_implementation


def resolve_device(name: str) -> torch.device:
    """``auto`` → CUDA when available, else CPU; otherwise the named device."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device={name} was requested but CUDA is not available here; use device=auto or device=cpu.")
    return torch.device(name)


def has_own_shards(data_dir: str | Path) -> bool:
    """Whether ``data_dir`` holds shards other than a generated synthetic task (whose manifest says so)."""
    data_dir = Path(data_dir)
    manifest = load_manifest(data_dir)
    return any(data_dir.glob("*.parquet")) and (manifest is None or "generator_version" not in manifest)


def require_data(cfg: RunConfig) -> None:
    """Before any work: a ``data.dir`` without shards is refused unless the config asks for the synthetic task."""
    if not has_own_shards(cfg.data.dir) and not cfg.generates_synthetic:
        why = "student.path is set" if cfg.data.synthetic.generate is None else "data.synthetic.generate=false"
        raise ConfigError(
            f"data.dir={cfg.data.dir} has no Parquet shards of its own and the synthetic task is off ({why}); convert your data "
            f"with `python jobs/prepare_data.py MIXTURE.yaml --out {cfg.data.dir}`, or set data.synthetic.generate=true."
        )


def prepare_data(cfg: RunConfig) -> Path:
    """``data.dir``, with the synthetic task generated there if it has no shards of its own and the config
    asks for it (:func:`require_data`). Nothing is read: see :func:`index_splits` and :func:`read_split_rows`."""
    require_data(cfg)
    data_dir = Path(cfg.data.dir)
    if not has_own_shards(data_dir):  # the synthetic task: (re)generated unless its manifest matches the config
        syn = cfg.data.synthetic
        generate_dataset(
            data_dir,
            {"train": syn.train, "val": syn.val, "test": syn.test},
            seed=syn.seed,
            **syn.generator_kwargs(),
        )
    return data_dir


def index_splits(
    cfg: RunConfig, student_dir: str | Path, measure: Callable[[Sequence[str]], pa.Table], splits: Sequence[str] = SPLITS
) -> dict[str, SplitIndex]:
    """The :class:`SplitIndex` of each of ``splits`` for the student at ``student_dir``: the rows' metadata,
    over-long and bad rows left out (``data.on_error``). Their rows are measured with ``measure``, in one pass,
    unless jobs/prepare_data.py measured them with this student's processor and the run's image resolution."""
    fingerprint = processor_fingerprint(student_dir, cfg.images.min_pixels, cfg.images.max_pixels)
    measured = None
    if needs_measuring(cfg.data.dir, fingerprint):
        started = time.perf_counter()
        measured = measure([str(f) for split in splits for f in shard_files(cfg.data.dir, split)])
        print(f"[data] measured {measured.num_rows} rows with the student's processor in {time.perf_counter() - started:.1f}s",
              flush=True)  # fmt: skip
    out = {}
    for split in splits:
        index = read_index(
            cfg.data.dir, split, cfg.data.max_length, cfg.data.on_error, None if measured is None else lambda _: measured
        )
        how = "token counts from the shards" if measured is None else "measured"
        skipped = f", skipped {index.stats.skipped} ({_reasons(index.stats.reasons)})" if index.stats.skipped else ""
        print(f"[data] {split}: {len(index)} rows ({how}){skipped}", flush=True)
        out[split] = index
    return out


def _reasons(reasons: dict[str, str]) -> str:
    """``{id: reason}`` -> ``"3 over-long, 1 missing field 'id'"``."""
    kinds = Counter(reason.split(":", 1)[0] if reason.startswith("over-long") else reason for reason in reasons.values())
    return ", ".join(f"{n} {kind}" for kind, n in kinds.most_common(3)) + (", ..." if len(kinds) > 3 else "")


def read_split_rows(cfg: RunConfig, split: str, ids: Iterable[str] | None = None, tasks: Sequence[str] = ()) -> list[dict]:
    """The whole rows of ``split`` (validated; bad rows skipped per ``data.on_error``): those in ``ids`` when
    given (the other rows are never read whole), of ``tasks`` when given. For the in-process runner and the
    tasks that use rows (a model's test pass, a tiny model's pretraining); the Ray driver never reads rows."""
    rows, _ = read_rows(cfg.data.dir, split=split, on_error=cfg.data.on_error, ids=None if ids is None else set(ids))
    return [r for r in rows if not tasks or r["task"] in tasks]


def train_texts(data_dir: str | Path) -> list[str]:
    """Every user and assistant text of the train split (the tiny tokenizer's corpus), from the shards'
    ``messages`` column alone."""
    files = [str(f) for f in shard_files(data_dir, "train")]
    return corpus_texts([{"messages": m} for m in pq.read_table(files, columns=["messages"]).column("messages").to_pylist()])


def tiny_tokenizer(cfg: RunConfig):
    """The offline-trained tokenizer for tiny models, cached in ``<data.dir>/tokenizer`` by corpus (the train texts)."""
    from transformers import AutoTokenizer  # noqa: PLC0415 - transformers loads on use, after the offline defaults

    texts = train_texts(cfg.data.dir)
    size = cfg.data.synthetic.tokenizer_vocab_size
    key = hashlib.sha256(json.dumps([sorted(set(texts)), size]).encode()).hexdigest()[:12]
    path = Path(cfg.data.dir) / TOKENIZER_DIR / f"{cfg.student.family}-{key}"
    if (path / "tokenizer.json").is_file():
        return AutoTokenizer.from_pretrained(str(path))
    tokenizer = train_tokenizer(texts, cfg.student.family, size)
    tokenizer.save_pretrained(str(path))
    return tokenizer


def build_model(cfg: RunConfig, role: str, tokenizer, device: torch.device) -> Backbone:
    """Load ``<role>.path`` (local directory) or build the tiny ``role`` model with ``tokenizer``,
    with the run's :class:`LoadSettings` for ``role``."""
    model: ModelConfig = getattr(cfg, role)
    settings = LoadSettings.of(cfg, role)
    if model.path is not None:
        return load_model(model.path, settings, device)
    backbone = get_family(model.family).build_tiny(role, tokenizer, **asdict(model.tiny))
    dtype = compute_dtype(settings.dtype, device, torch.float32)
    backbone.model.to(device=device, dtype=dtype)
    backbone.compute_dtype = backbone.checkpoint_dtype = dtype
    return settings.apply(backbone)


def model_key(model: ModelConfig, *parts) -> str:
    """Short stable hash of a model config plus anything else that decides its trained weights."""
    weights = {f.name for f in fields(ModelConfig)}  # a teacher's signal source does not change its weights
    blob = json.dumps([{k: v for k, v in asdict(model).items() if k in weights}, *parts], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def make_collator(backbone: Backbone | ModelInfo, cfg: RunConfig, vision_filler: bool = False) -> ChatCollator:
    """The single collate path shared by teacher, student, training and evaluation (a :class:`ModelInfo`
    gives the same collator without loading weights). ``vision_filler``: a blank, masked image in batches
    without images (ZeRO ranks must all run the vision tower; :class:`ChatCollator`)."""
    return ChatCollator(
        backbone.tokenizer, backbone.image_processor, backbone.family, cfg.data.max_length, vision_filler=vision_filler
    )


def check_pair(teacher: Backbone | ModelInfo, student: Backbone | ModelInfo) -> int:
    """Refuse incompatible models; return the shared vocabulary size (the KL's support)."""
    check_compatible(teacher, student)
    return min(teacher.vocab_size, student.vocab_size)


def model_info(path: str | Path, settings: LoadSettings) -> ModelInfo:
    """:class:`ModelInfo` of the checkpoint at ``path`` (no weights), with the run's image resolution."""
    info = ModelInfo.from_pretrained(path)
    apply_resolution(info, settings.min_pixels, settings.max_pixels)
    return info


def check_pair_paths(teacher_dir: str | Path, student_dir: str | Path, cfg: RunConfig | None = None) -> int:
    """:func:`check_pair` on two checkpoint directories without loading their weights (with ``cfg``'s
    image resolution applied to both, when given)."""
    settings = {role: LoadSettings.of(cfg, role) if cfg is not None else LoadSettings(role) for role in ("teacher", "student")}
    return check_pair(model_info(teacher_dir, settings["teacher"]), model_info(student_dir, settings["student"]))


def check_tensor_parallel(teacher: Backbone | ModelInfo, tensor_parallel: int) -> None:
    """Refuse a ``teacher_pool.tensor_parallel`` that does not divide the teacher's attention and
    key/value heads (each rank holds whole heads)."""
    text = teacher.config.get_text_config() if isinstance(teacher, ModelInfo) else teacher.model.config.get_text_config()
    heads = text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    if heads % tensor_parallel or kv_heads % tensor_parallel:
        divisors = [n for n in range(1, kv_heads + 1) if heads % n == 0 and kv_heads % n == 0]
        raise ConfigError(
            f"teacher_pool.tensor_parallel={tensor_parallel} does not divide the teacher's {heads} attention and "
            f"{kv_heads} key/value heads; use one of {divisors}."
        )


def new_verbalizers(cfg: RunConfig, role: str, model: Backbone | ModelInfo, seed: int) -> Verbalizers:
    """Freshly initialised verb-FFNs at ``role``'s target layers (float32; next to a loaded backbone's
    LM head, on the CPU for a weight-free :class:`ModelInfo`).

    Initialised from ``seed`` alone (the global RNG is left untouched), so every runner and every
    process draws the same weights.
    """
    v = cfg.verbalizer
    layers = getattr(cfg, role).targets.resolve(model.num_layers)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        verbs = Verbalizers(model.hidden_size, layers, v.residual, v.zero_init, v.final_norm)
    if isinstance(model, Backbone):
        verbs = verbs.to(model.lm_head.weight.device)  # next to the heads they feed (the last GPU of a spread model)
    return verbs


def frozen_verbalizers(verbalizers: Verbalizers, backbone: Backbone) -> Verbalizers:
    """``verbalizers`` in eval mode and in ``backbone``'s compute dtype: frozen weights (step 2's
    teacher side) need no float32 master (a 72B teacher's 20 verb-FFNs are 8 GB in bfloat16)."""
    return verbalizers.to(dtype=backbone.compute_dtype).eval()
