"""Typed run configuration: dataclasses loaded with omegaconf from YAML plus ``key=value`` overrides.

Every key a user can set lives here, with the paper's default where the paper states one (see
``../shared/VLSI_METHOD.md``). :func:`load_config` validates the whole tree before any work starts
and turns every problem into a :class:`ConfigError` whose message is one sentence naming the key.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from vlsi_ray.data.synthetic import SCORED_TASKS, Difficulty
from vlsi_ray.env import ray_job_working_dir
from vlsi_ray.method.loop import OptimConfig
from vlsi_ray.method.matching import MatchingOptions
from vlsi_ray.method.steps import LossOptions
from vlsi_ray.models.families import FAMILIES, UnsupportedModelError, detect_family, get_family
from vlsi_ray.recipe.layout import RunLayout

STEPS = ("pretrain_teacher", "pretrain_student", "verbalize", "interact", "sft")
EVAL_MODELS = ("teacher", "student_base", "student_sft_only", "vlsi_without_sft", "vlsi")
EVAL_PRIORITIES = ("idle", "normal")
#: ``<model>.dtype`` values (:mod:`vlsi_ray.models.precision`; kept here so validation needs no torch import)
DTYPES = ("auto", "bfloat16", "float16", "float32")
#: ``<model>.attn_implementation`` values (transformers' spellings; auto: flash_attention_2 where installed, else sdpa)
ATTN_IMPLEMENTATIONS = ("sdpa", "eager", "flash_attention_2", "auto")


class ConfigError(ValueError):
    """A configuration problem, explained in one sentence that names the key and the fix."""


@dataclass
class TinyModelConfig:
    """Sizes of a tiny model built offline when ``path`` is not given (the CPU demo and the tests)."""

    hidden_size: int = 64
    num_layers: int = 4
    num_heads: int = 4
    intermediate_size: int = 128
    vision_embed_dim: int = 32
    vision_depth: int = 1
    seed: int = 0
    init_gain: float = 1.0  # Linear weights ~ N(0, gain²/fan_in); 0 keeps transformers' std 0.02


@dataclass
class TargetLayersConfig:
    """Which decoder blocks get a verbalizer; 1-based block outputs (``hidden_states[k]``).

    Either an explicit ``layers`` list or the rule "every ``every`` blocks starting at ``start``"
    (the paper: student 2, 6, ..., 26 is ``start=2, every=4``). The final block is never a target:
    it has its own loss.
    """

    layers: list[int] = field(default_factory=list)
    start: int = 1
    every: int = 1

    def resolve(self, num_layers: int) -> list[int]:
        """Return the sorted 1-based target blocks for a model with ``num_layers`` decoder blocks."""
        if self.layers:
            return sorted(self.layers)
        return list(range(self.start, num_layers, self.every))


@dataclass
class ModelConfig:
    """One backbone: a local checkpoint directory (``path``) or a tiny model built offline, and how it runs."""

    family: str = "qwen2_vl"
    path: Optional[str] = None
    tiny: TinyModelConfig = field(default_factory=TinyModelConfig)
    targets: TargetLayersConfig = field(default_factory=TargetLayersConfig)
    # Compute dtype the weights are loaded in: auto = bfloat16 on CUDA, the checkpoint's own dtype on
    # CPU (float32 for tiny models). Trainable weights keep float32 masters; losses run in float32.
    dtype: str = "auto"
    # sdpa | eager | flash_attention_2 (needs CUDA and flash-attn where the model runs) | auto (flash_attention_2 where installed, else sdpa)
    attn_implementation: str = "sdpa"
    # Recompute each block in backward instead of storing its activations, wherever gradients flow
    # through this model (the student in steps 2, 3 and the SFT baseline; a tiny model's pretraining).
    gradient_checkpointing: bool = False


@dataclass
class TeacherConfig(ModelConfig):
    """The teacher: a :class:`ModelConfig` plus where step 2 gets its signal from."""

    source: str = "live"  # live: teacher actors (or the in-process teacher) | cache: jobs/teacher_cache.py's Parquet signal
    cache_dir: Optional[str] = None  # the teacher cache (null: <run_dir>/teacher_cache)


@dataclass
class VerbalizerConfig:
    """verb-FFN form. Paper: gated d×d FFN; project choice: final norm + residual + zero-init."""

    residual: bool = True
    zero_init: bool = True
    final_norm: bool = True


@dataclass
class SignalConfig:
    """What the teacher sends: top-k log-probs + tail mass (``topk``), or dense (debug) when null."""

    topk: Optional[int] = 64
    storage: str = "float16"  # dtype of the log-probs on the wire: float16 | float32
    # Ids drawn per token and layer from the teacher's tail (top-k only): the KL then adds an unbiased
    # estimate of the part inside the tail that top-k + tail mass misses. 0 = none.
    tail_samples: int = 0


@dataclass
class ResourcesConfig:
    """Ray resources of one actor or Train worker (custom resources pin roles to node groups)."""

    num_cpus: float = 1.0
    num_gpus: float = 0.0
    resources: dict[str, float] = field(default_factory=dict)


@dataclass
class TeacherPoolConfig:
    """The teacher actors of the Ray runner (frozen teacher + its verbalizers, one per replica)."""

    replicas: int = 1
    # GPUs (ranks) per replica: >1 splits each teacher layer over that many actors joined by torch.distributed
    # (transformers' tensor-parallel plan); resources are per replica, each rank gets its share
    tensor_parallel: int = 1
    # Step 1 trains the teacher's verb-FFNs on every replica at once (each a share of every optimizer step's
    # micro-batches, gradients averaged); false: on replica 0 alone, the others load them after
    step1_data_parallel: bool = True
    # Step 1's optimizer on the teacher side: "replicated" (float32 AdamW whole on every GPU: 16 bytes a verb-FFN
    # parameter) or "zero2-offload" (weights in the compute dtype on the GPU; float32 masters, gradients and moments
    # split over the replicas in host memory, AdamW on the host: what fits a 72B teacher's 4B verb-FFN parameters)
    step1_optimizer: str = "replicated"
    # With tensor_parallel > 1: split every verb-FFN over the replica's ranks (gate/up column-wise, down row-wise)
    # instead of holding it whole on each (a 72B teacher's 20 are 8 GB in bfloat16)
    shard_verbalizers: bool = False
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)
    placement_strategy: str = "PACK"  # placement group over the replicas: PACK | SPREAD | STRICT_PACK | STRICT_SPREAD
    lookahead: int = 2  # batches requested ahead of the one the student trains on (bounds in-flight signals)
    max_restarts: int = 3  # Ray restarts a dead teacher actor this often (it reloads from disk)
    max_task_retries: int = 3  # a request to a dead actor is retried on its restart
    placement_timeout_s: float = 600.0  # how long to wait for the pool's resources (an autoscaler adds GPU nodes in minutes)
    kill_at_request: int = 0  # fault injection (tests, drills): a replica never restarted SIGKILLs itself at this request
    # A replica takes two requests at once: the next batch's decoding and the last signal's encoding (host work)
    # run while the current forward holds the device (one forward at a time). Host<->device copies stay on the
    # device's default stream, in order with the forwards.
    overlap_host_work: bool = True


#: Student stages without a teacher: with ``train.sft_workers`` they run in a Train run of their own.
SFT_RUN_STAGES = ("baseline_sft", "sft")


@dataclass
class TrainConfig:
    """The student side of the Ray runner: Ray Train workers, DeepSpeed, checkpoints, reports."""

    num_workers: int = 1
    use_gpu: Optional[bool] = None  # null: use GPUs when the cluster has any
    resources_per_worker: ResourcesConfig = field(default_factory=ResourcesConfig)
    # The SFT stages (step 3, the SFT-only baseline) need no teacher: > 0 runs them in a Train run of their own on
    # this many workers once the teacher pool is gone (its GPUs free), each asking sft_resources_per_worker;
    # 0: in the run of steps 1-2, on num_workers
    sft_workers: int = 0
    sft_resources_per_worker: ResourcesConfig = field(default_factory=ResourcesConfig)
    deepspeed_stage: int = 0  # 0: plain data parallelism (all-reduce); 2 / 3: DeepSpeed ZeRO-2 / ZeRO-3
    report_every: int = 50  # steps between ray.train.report calls (each costs about a second)
    checkpoint_every: int = 100  # steps between resumable checkpoints (0: only at the end)
    max_failures: int = 2  # worker-group restarts from the last checkpoint (FailureConfig)
    # seconds a Train worker waits in one collective (all-reduce, ZeRO gather) before its group fails (TorchConfig)
    collective_timeout_s: int = 1800
    log_ids: bool = False  # write every consumed row id to <stage>/consumed_ids.*.jsonl (a data audit)
    fail_at_step: int = 0  # fault injection (tests, drills): a worker that started fresh SIGKILLs itself after this step

    def workers_for(self, stage: str) -> tuple[int, ResourcesConfig]:
        """Train workers of student stage ``stage`` and what each asks Ray for: ``sft_workers`` ×
        ``sft_resources_per_worker`` for the SFT stages (:data:`SFT_RUN_STAGES`) when set, else
        ``num_workers`` × ``resources_per_worker``."""
        if self.sft_workers and stage in SFT_RUN_STAGES:
            return self.sft_workers, self.sft_resources_per_worker
        return self.num_workers, self.resources_per_worker


@dataclass
class RayConfig:
    """Where the Ray runner runs: an existing cluster (``address``/RAY_ADDRESS) or a local Ray."""

    address: Optional[str] = None  # null: RAY_ADDRESS if set, else start a local Ray
    num_cpus: Optional[int] = None  # local Ray only: logical CPUs (null: the machine's)
    num_gpus: Optional[int] = None  # local Ray only: logical GPUs (fake ones test placement)
    include_dashboard: bool = True  # local Ray only: the dashboard process (it costs CPU a small machine notices)
    logger: str = "wandb"  # wandb (offline unless WANDB_MODE says otherwise) | none
    # Workers keep freed memory for reuse instead of page-faulting it in again every CPU training step
    # (vlsi_ray.env.MALLOC_ENV); MALLOC_* variables the user set win.
    tune_malloc: bool = True


@dataclass
class LoraConfig:
    """Step-2 LoRA on the student's language model (paper: rank 64, alpha 64)."""

    rank: int = 64
    alpha: int = 64
    dropout: float = 0.0


@dataclass
class StagesConfig:
    """Optimisation settings per stage (each stage restarts its cosine schedule, as in the paper)."""

    pretrain_teacher: OptimConfig = field(default_factory=OptimConfig)
    pretrain_student: OptimConfig = field(default_factory=OptimConfig)
    verbalize: OptimConfig = field(default_factory=OptimConfig)
    interact: OptimConfig = field(default_factory=OptimConfig)
    sft: OptimConfig = field(default_factory=OptimConfig)
    sft_lora: bool = False  # step 3 (and the SFT-only baseline) through LoRA instead of full fine-tuning of the LLM


@dataclass
class SyntheticConfig:
    """The synthetic shapes task, generated offline into ``data.dir`` when that has no shards of its own."""

    # Whether a data.dir without shards gets the synthetic task: null = only when the student is tiny
    # (a run that trains a real checkpoint never trains it on coloured shapes by accident).
    generate: Optional[bool] = None
    train: int = 6000
    val: int = 500
    test: int = 1000
    seed: int = 0
    rows_per_shard: int = 1000
    caption_fraction: float = 0.0
    tasks: list[str] = field(default_factory=list)  # scored task types to generate; empty = all five
    min_objects: int = 2
    max_objects: int = 5
    dot_prob: float = 0.25
    distractors: bool = True  # false: only the objects a question needs
    # true: each response is the letter, then a description of the image ("B. red star at row 1 column 2. ..."),
    # so that a row carries many decisions about the image; accuracy still scores the letter
    explain: bool = False
    tokenizer_vocab_size: int = 512

    def generator_kwargs(self) -> dict:
        """Keyword arguments of :func:`vlsi_ray.data.shards.generate_dataset` beyond sizes and seed."""
        kwargs = dict(
            rows_per_shard=self.rows_per_shard,
            caption_fraction=self.caption_fraction,
            min_objects=self.min_objects,
            max_objects=self.max_objects,
            dot_prob=self.dot_prob,
            distractors=self.distractors,
        )
        if self.tasks:
            kwargs["tasks"] = list(self.tasks)
        if self.explain:  # only when set: the default's manifests (and the pinned teacher's) stay as they were
            kwargs["explain"] = True
        return kwargs


@dataclass
class ImagesConfig:
    """Image resolution, applied identically to the teacher's and the student's image processors
    (null: the checkpoints' own ``preprocessor_config.json``). Qwen2-VL / Qwen2.5-VL: the pixel range an
    image is resized into (``min_pixels/784 .. max_pixels/784`` image tokens). LLaVA-OneVision:
    ``max_pixels`` drops the crop grids above it; it has no ``min_pixels``."""

    min_pixels: Optional[int] = None
    max_pixels: Optional[int] = None


@dataclass
class DataConfig:
    """Where the Parquet shards live and how bad rows are handled."""

    dir: str = "data/synthetic"
    on_error: str = "skip"  # skip (and count) | raise
    max_length: int = 256
    # Ray runner: a train split whose Parquet shards total at most this many MB is read once,
    # kept in the object store and sorted per epoch in one task; larger ones stream from the files
    # through Ray Data's distributed sort (same order either way).
    sort_in_memory_mb: float = 512
    # Ray runner: shards (every split) totalling at most this many MB are measured (validated, token counts) by
    # the driver itself, in seconds; larger ones by a pool of Ray Data actors, which costs about 20 s to start
    # (each loads torch, transformers and the processor) and then scales with the cluster. 0: always Ray Data.
    measure_in_driver_mb: float = 64
    # Length-grouped batches (not in the paper; LLaVA's group_by_modality_length does the like): each epoch's
    # shuffled rows fall in groups of length_group_batches global batches, each group ordered longest first,
    # so a batch holds rows of similar token counts and little padding.
    group_by_length: bool = False
    length_group_batches: int = 50
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)


@dataclass
class RunConfig:
    """The whole run: models, method options, stages, data and where outputs go."""

    name: str = "tiny"
    output_dir: str = "runs"
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    runner: str = "ray"  # ray: teacher actors + Ray Train student | local: the in-process reference
    steps: list[str] = field(default_factory=lambda: list(STEPS))
    baseline_sft: bool = True  # also train the student by SFT alone (same data/steps) for the report
    model_cache_dir: Optional[str] = None  # pretrained tiny teacher/student models, reused across runs with the same settings
    eval_batch_size: int = 32
    eval_tasks: int = 1  # Ray runner: each model's test pass is split over this many Ray tasks (tiny.yaml: 2 cores, 2)
    # Ray runner: idle | normal. idle: test passes, which run beside later stages, compute at Linux's
    # SCHED_IDLE priority, i.e. only on CPU time the training leaves; normal: an equal share.
    eval_priority: str = "idle"
    # Models whose test accuracy goes in the report (each is a full pass over the test split; at
    # 72B the teacher's pass is the expensive one).
    eval_models: list[str] = field(default_factory=lambda: list(EVAL_MODELS))
    # Each evaluated model is scored on every test row (held-out loss per source; accuracy on rows whose
    # answer is an option letter); eval_val_loss adds the val rows' loss (one more pass over val per model).
    eval_val_loss: bool = False
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    student: ModelConfig = field(default_factory=ModelConfig)
    images: ImagesConfig = field(default_factory=ImagesConfig)
    verbalizer: VerbalizerConfig = field(default_factory=VerbalizerConfig)
    matching: MatchingOptions = field(default_factory=MatchingOptions)  # validated by its own __post_init__
    loss: LossOptions = field(default_factory=LossOptions)  # validated by its own __post_init__
    signal: SignalConfig = field(default_factory=SignalConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    stages: StagesConfig = field(default_factory=StagesConfig)
    data: DataConfig = field(default_factory=DataConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    teacher_pool: TeacherPoolConfig = field(default_factory=TeacherPoolConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    @property
    def run_dir(self) -> Path:
        """Directory of this run's checkpoints, metrics and report."""
        return Path(self.output_dir) / self.name

    @property
    def generates_synthetic(self) -> bool:
        """Whether a ``data.dir`` without shards gets the synthetic task (``data.synthetic.generate``)."""
        generate = self.data.synthetic.generate
        return generate if generate is not None else self.student.path is None

    @property
    def teacher_cache(self) -> Path:
        """Directory of the offline teacher signal (``teacher.cache_dir``, else ``<run_dir>/teacher_cache``)."""
        return Path(self.teacher.cache_dir) if self.teacher.cache_dir else RunLayout(self.run_dir).teacher_cache


_CHOICES = {
    "teacher.family": tuple(FAMILIES),
    "teacher.source": ("live", "cache"),
    "student.family": tuple(FAMILIES),
    "teacher.dtype": DTYPES,
    "student.dtype": DTYPES,
    "teacher.attn_implementation": ATTN_IMPLEMENTATIONS,
    "student.attn_implementation": ATTN_IMPLEMENTATIONS,
    "runner": ("ray", "local"),
    "signal.storage": ("float16", "float32"),
    "teacher_pool.placement_strategy": ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"),
    "train.deepspeed_stage": (0, 2, 3),
    "ray.logger": ("wandb", "none"),
    "data.on_error": ("skip", "raise"),
}


def load_config(path: str | Path | None = None, overrides: Sequence[str] = (), _text: str | None = None) -> RunConfig:
    """Load ``path`` (YAML, optional) over the schema defaults, apply ``key=value`` overrides, validate.

    Raises :class:`ConfigError` (one sentence naming the key) on an unknown key, a wrong type or a
    value the run cannot use; nothing else is touched before this returns.
    """
    schema = OmegaConf.structured(RunConfig)
    try:
        layers = [schema]
        if path is not None:
            if not Path(path).is_file():
                raise ConfigError(f"config file {path} does not exist; pass an existing YAML file to --config.")
            layers.append(OmegaConf.load(path))
        if _text is not None:
            layers.append(OmegaConf.create(_text))
        bad = [o for o in overrides if "=" not in o]
        if bad:
            raise ConfigError(f"override {bad[0]!r} is not of the form key=value; write it like seed=1.")
        layers.append(OmegaConf.from_dotlist(list(overrides)))
        merged = OmegaConf.merge(*layers)
        cfg: RunConfig = OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        raise ConfigError(explain_omegaconf_error(err, path)) from None
    except ValueError as err:  # a section's own validation (e.g. MatchingOptions), already one sentence
        raise ConfigError(str(err)) from None
    validate(cfg)
    return cfg


#: Config keys that were renamed: old name -> (new name, why), so an old config gets told what to write.
RENAMED = {
    "teacher_cache_dir": (
        "model_cache_dir",
        "it caches the pretrained tiny models, teacher and student; teacher.cache_dir is the teacher's signal cache",
    ),
}


def explain_omegaconf_error(err: OmegaConfBaseException, path: Any) -> str:
    """One sentence naming the key an omegaconf merge or conversion failed on (``path``: where it came from)."""
    key = getattr(err, "full_key", None) or "?"
    where = f" in {path}" if path else ""
    text = str(err).splitlines()[0]
    if key in RENAMED:
        new, why = RENAMED[key]
        return f"config key '{key}'{where} is now '{new}' ({why}); rename it."
    if "not in struct" in text or ("Key '" in text and "not" in text):
        return f"unknown config key '{key}'{where}; check the spelling against vlsi_ray/config.py."
    return f"config key '{key}'{where} has a bad value ({text}); fix its type or value."


def validate(cfg: RunConfig) -> None:
    """Check values the schema's types cannot express; raise :class:`ConfigError` naming the key."""
    flat = OmegaConf.to_container(OmegaConf.structured(cfg))
    for key, allowed in _CHOICES.items():
        value = _get(flat, key)
        if value not in allowed:
            raise ConfigError(f"{key}={value!r} is not one of {', '.join(allowed)}; pick one of those.")
    for key, values, known in (("steps", cfg.steps, STEPS), ("eval_models", cfg.eval_models, EVAL_MODELS)):
        unknown = [v for v in values if v not in known]
        if unknown:
            raise ConfigError(f"{key} contains unknown entry {unknown[0]!r}; choose from {', '.join(known)}.")
    if cfg.eval_tasks < 1:
        raise ConfigError(f"eval_tasks={cfg.eval_tasks} must be at least 1 (Ray tasks per model's test pass).")
    if cfg.eval_priority not in EVAL_PRIORITIES:
        raise ConfigError(
            f"eval_priority={cfg.eval_priority!r} is not one of {', '.join(EVAL_PRIORITIES)}; use idle (the default) or normal."
        )
    if not (cfg.device == "auto" or cfg.device == "cpu" or cfg.device.startswith("cuda")):
        raise ConfigError(f"device={cfg.device!r} is not auto, cpu or cuda[:N]; pick one of those.")
    families = _validate_models(cfg)
    _validate_signal(cfg)
    for stage in STEPS:
        _validate_optim(getattr(cfg.stages, stage), f"stages.{stage}")
    _validate_data(cfg, families["student"])
    _validate_ray(cfg)
    _validate_job_paths(cfg)


def _validate_models(cfg: RunConfig) -> dict[str, str]:
    """Each model's section, one family for both, target layers that fit; returns the families by role."""
    for role in ("teacher", "student"):
        _validate_model(getattr(cfg, role), role)
    families = {role: model_family(getattr(cfg, role), role) for role in ("teacher", "student")}
    if families["teacher"] != families["student"]:
        what = {role: f"{role}.path holds a {families[role]} model" if getattr(cfg, role).path else f"{role}.family={families[role]}"
                for role in families}  # fmt: skip
        raise ConfigError(
            f"{what['teacher']} but {what['student']}; VLsI needs a teacher and a student of the same family and tokenizer."
        )
    t_s, t_l = len(_targets_if_known(cfg.student)), len(_targets_if_known(cfg.teacher))
    if t_s and t_l and t_s > t_l:
        raise ConfigError(f"the student has {t_s} target layers but the teacher only {t_l} (t_s > t_l); "
                          "give student.targets fewer layers or teacher.targets more.")  # fmt: skip
    if cfg.lora.rank < 1 or cfg.lora.alpha <= 0:
        raise ConfigError("lora.rank must be at least 1 and lora.alpha positive.")
    return families


def _validate_signal(cfg: RunConfig) -> None:
    signal = cfg.signal
    if signal.topk is not None and signal.topk < 1:
        raise ConfigError(f"signal.topk={signal.topk} must be at least 1, or null for a dense signal.")
    if signal.tail_samples < 0:
        raise ConfigError(f"signal.tail_samples={signal.tail_samples} must be 0 (no tail samples) or more.")
    if cfg.teacher.source == "cache" and signal.topk is None:
        raise ConfigError(
            "teacher.source=cache stores a top-k signal, but signal.topk is null (dense); set signal.topk or teacher.source=live."
        )
    if signal.tail_samples and signal.topk is None:
        raise ConfigError(
            f"signal.tail_samples={signal.tail_samples} needs a top-k signal; set signal.topk or signal.tail_samples=0."
        )


def _validate_data(cfg: RunConfig, family: str) -> None:
    """The data section, the synthetic task's settings and the image resolution (``family``: the models')."""
    if cfg.data.sort_in_memory_mb < 0:
        raise ConfigError(f"data.sort_in_memory_mb={cfg.data.sort_in_memory_mb} must be 0 (always the distributed sort) or more.")
    if cfg.data.measure_in_driver_mb < 0:
        raise ConfigError(
            f"data.measure_in_driver_mb={cfg.data.measure_in_driver_mb} must be 0 (always Ray Data workers) or more."
        )
    if cfg.data.length_group_batches < 1:
        raise ConfigError(f"data.length_group_batches={cfg.data.length_group_batches} must be at least 1 batch per group.")
    syn = cfg.data.synthetic
    for split in ("train", "val", "test"):
        if getattr(syn, split) < 1:
            raise ConfigError(f"data.synthetic.{split} must be at least 1 row.")
    unknown_tasks = [t for t in syn.tasks if t not in SCORED_TASKS]
    if unknown_tasks:
        raise ConfigError(f"data.synthetic.tasks has unknown task {unknown_tasks[0]!r}; choose from {', '.join(SCORED_TASKS)}.")
    try:  # the generator's own check, so the limits live in one place
        Difficulty(syn.min_objects, syn.max_objects, syn.dot_prob, syn.distractors).check(grid=4)
    except ValueError as err:
        raise ConfigError(f"data.synthetic: {err}") from None
    if not 0.0 <= syn.caption_fraction < 1.0:
        raise ConfigError(f"data.synthetic.caption_fraction={syn.caption_fraction} must be in [0, 1).")
    images = cfg.images
    for key in ("min_pixels", "max_pixels"):
        if getattr(images, key) is not None and getattr(images, key) < 1:
            raise ConfigError(
                f"images.{key}={getattr(images, key)} must be a positive number of pixels, or null for the checkpoints' own setting."
            )
    if None not in (images.min_pixels, images.max_pixels) and images.min_pixels > images.max_pixels:
        raise ConfigError(
            f"images.min_pixels={images.min_pixels} exceeds images.max_pixels={images.max_pixels}; lower min_pixels or raise max_pixels."
        )
    if images.min_pixels is not None and not get_family(family).has_min_pixels:
        raise ConfigError(f"images.min_pixels has no {family} equivalent (images are resized to their best crop grid); "
                          "leave it null and bound the resolution with images.max_pixels.")  # fmt: skip


def model_family(model: ModelConfig, role: str) -> str:
    """The family a model config names: its checkpoint's (config.json, no weights read), else ``family``."""
    if model.path is None:
        return model.family
    try:
        return detect_family(model.path)
    except UnsupportedModelError as err:
        raise ConfigError(f"{role}.path: {err}") from None


def _validate_model(model: ModelConfig, role: str) -> None:
    if model.path is not None and not Path(model.path).is_dir():
        raise ConfigError(f"{role}.path={model.path} is not a directory; point it at a local checkpoint (nothing is downloaded).")
    tiny = model.tiny
    if model.path is None:
        if tiny.num_layers < 2 or tiny.hidden_size < 1:
            raise ConfigError(f"{role}.tiny.num_layers must be at least 2 and hidden_size positive.")
        if tiny.hidden_size % tiny.num_heads:
            raise ConfigError(f"{role}.tiny.hidden_size={tiny.hidden_size} is not divisible by num_heads={tiny.num_heads}.")
    targets = model.targets
    if targets.every < 1 or targets.start < 1:
        raise ConfigError(f"{role}.targets.start and {role}.targets.every must be at least 1.")
    if len(set(targets.layers)) != len(targets.layers):
        raise ConfigError(f"{role}.targets.layers={targets.layers} repeats a layer; list each block once.")
    layers = _targets_if_known(model)
    if model.path is None and not layers:
        raise ConfigError(f"{role}.targets selects no layer of a {tiny.num_layers}-layer model; lower {role}.targets.start.")
    num_layers = tiny.num_layers if model.path is None else None
    for layer in layers:
        if layer < 1 or (num_layers is not None and layer >= num_layers):
            limit = f"1..{num_layers - 1}" if num_layers else "≥ 1"
            raise ConfigError(
                f"{role}.targets has layer {layer}, outside {limit} (the final block is not a target); fix {role}.targets."
            )


def _targets_if_known(model: ModelConfig) -> list[int]:
    """Target layers when they can be known before loading the model (tiny, or an explicit list)."""
    if model.targets.layers:
        return sorted(model.targets.layers)
    if model.path is None:
        return model.targets.resolve(model.tiny.num_layers)
    return []


#: ``teacher_pool.step1_optimizer`` values (:class:`~vlsi_ray.method.offload.OffloadStepper` for the second).
STEP1_OPTIMIZERS = ("replicated", "zero2-offload")


def _validate_ray(cfg: RunConfig) -> None:
    pool, train = cfg.teacher_pool, cfg.train
    for key, res in (
        ("teacher_pool.resources", pool.resources),
        ("train.resources_per_worker", train.resources_per_worker),
        ("train.sft_resources_per_worker", train.sft_resources_per_worker),
    ):
        if res.num_cpus < 0 or res.num_gpus < 0 or any(v < 0 for v in res.resources.values()):
            raise ConfigError(f"{key} asks for a negative amount of a resource; use values >= 0.")
    if pool.replicas < 1 or train.num_workers < 1:
        raise ConfigError("teacher_pool.replicas and train.num_workers must be at least 1.")
    if train.sft_workers < 0:
        raise ConfigError(f"train.sft_workers={train.sft_workers} must be >= 0 (0: the SFT stages run on train.num_workers).")
    if pool.tensor_parallel < 1:
        raise ConfigError(f"teacher_pool.tensor_parallel={pool.tensor_parallel} must be at least 1 (1: no tensor parallelism).")
    if pool.tensor_parallel > 1 and pool.resources.num_gpus not in (0, pool.tensor_parallel):
        raise ConfigError(
            f"teacher_pool.resources.num_gpus={pool.resources.num_gpus:g} with teacher_pool.tensor_parallel={pool.tensor_parallel}: "
            "a tensor-parallel replica runs one rank per GPU; set num_gpus to tensor_parallel (or 0 on CPU)."
        )
    accum = cfg.stages.verbalize.grad_accum
    if pool.step1_data_parallel and pool.replicas > 1 and "verbalize" in cfg.steps and accum % pool.replicas:
        raise ConfigError(
            f"stages.verbalize.grad_accum={accum} does not split over teacher_pool.replicas={pool.replicas} (step 1 is "
            "data-parallel over the replicas); make it a multiple of the replicas or set teacher_pool.step1_data_parallel=false."
        )
    if pool.step1_optimizer not in STEP1_OPTIMIZERS:
        raise ConfigError(
            f"teacher_pool.step1_optimizer={pool.step1_optimizer!r} is not one of {', '.join(STEP1_OPTIMIZERS)}; pick one of those."
        )
    if pool.step1_optimizer == "zero2-offload" and cfg.teacher.dtype == "float16":
        raise ConfigError(
            "teacher_pool.step1_optimizer=zero2-offload has no float16 loss scaling; set teacher.dtype=bfloat16 (or auto on a GPU with it)."
        )
    if pool.lookahead < 0 or pool.max_restarts < -1 or pool.max_task_retries < -1:
        raise ConfigError("teacher_pool.lookahead must be >= 0 and max_restarts/max_task_retries >= -1 (-1: unlimited).")
    if train.collective_timeout_s < 1:
        raise ConfigError(f"train.collective_timeout_s={train.collective_timeout_s} must be at least 1 second.")
    if train.report_every < 1 or train.checkpoint_every < 0 or train.max_failures < -1:
        raise ConfigError("train.report_every must be >= 1, train.checkpoint_every >= 0 and train.max_failures >= -1.")


#: Keys of paths a run writes to (outputs, generated data, caches).
WRITTEN_PATHS = ("output_dir", "data.dir", "model_cache_dir", "teacher.cache_dir")


def _validate_job_paths(cfg: RunConfig) -> None:
    """In a ``ray job submit --working-dir`` job, refuse relative paths the run would write to: they would
    land in Ray's temporary copy of the working directory, which Ray deletes."""
    copy = ray_job_working_dir()
    if copy is None:
        return
    flat = OmegaConf.to_container(OmegaConf.structured(cfg))
    relative = [
        f"{key}={_get(flat, key)}" for key in WRITTEN_PATHS if _get(flat, key) and not Path(_get(flat, key)).is_absolute()
    ]
    if relative:
        raise ConfigError(
            f"{', '.join(relative)} {'is' if len(relative) == 1 else 'are'} relative, and this Ray job runs in a temporary copy "
            f"of its working directory ({copy}) that Ray deletes; pass absolute paths on the submitting machine or a shared "
            f"volume, e.g. {relative[0].split('=')[0]}=$PWD/{relative[0].split('=', 1)[1]}."
        )


def _validate_optim(opt: OptimConfig, key: str) -> None:
    if opt.lr <= 0 or opt.min_lr < 0 or opt.min_lr > opt.lr:
        raise ConfigError(f"{key}.lr must be positive and {key}.min_lr in [0, lr].")
    if opt.batch_size < 1 or opt.grad_accum < 1:
        raise ConfigError(f"{key}.batch_size and {key}.grad_accum must be at least 1.")
    if opt.max_steps < 0 or (opt.max_steps == 0 and opt.epochs <= 0):
        raise ConfigError(f"{key}.max_steps must be positive, or 0 with {key}.epochs > 0.")
    if opt.log_every < 1:
        raise ConfigError(f"{key}.log_every must be at least 1.")


def _get(tree: dict, dotted: str) -> Any:
    for part in dotted.split("."):
        tree = tree[part]
    return tree


def with_absolute_model_paths(cfg: RunConfig) -> RunConfig:
    """A copy of ``cfg`` whose ``teacher.path`` and ``student.path`` are absolute (resolved against this
    process's working directory): the config Ray actors and Train workers receive, since they do not run
    in the driver's working directory (Ray Train moves its workers into their run directories)."""
    out = copy.deepcopy(cfg)
    for model in (out.teacher, out.student):
        if model.path is not None:
            model.path = str(Path(model.path).resolve())
    return out


def config_from_yaml(text: str) -> RunConfig:
    """Rebuild a config from :func:`to_yaml`'s text (how Ray actors and workers receive it), validated."""
    return load_config(None, [], _text=text)


def to_yaml(cfg: RunConfig) -> str:
    """The resolved config as YAML, written next to every run so it can be re-run exactly."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))
