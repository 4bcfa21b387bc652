"""``jobs/distill.py --dry-run``: check a run in seconds before booking the cluster, without loading a weight.

:func:`dry_run` validates what a real run would meet first: both models' configs, tokenizers and
processors (weight-free :class:`~vlsi_ray.models.backbone.ModelInfo`, with ``images.*`` applied), the
teacher/student pair check, the data's metadata (row counts per split from the Parquet footers) and
the train rows' token lengths (image tokens included; the shards' own counts when jobs/prepare_data.py
measured them with this student, else a sample collated with the student's collator), as a histogram
with how many rows ``data.max_length`` would leave out and which rows are bad, and why.
It then prints the stage plan (steps, rows, optimizer steps, samples, learning rates), the
placement (actors, Train workers, GPUs, custom resources) and, for real checkpoints on Ray, the cost
model's estimate on A100 and H100 machines (:mod:`vlsi_ray.scale`: bottlenecks, GiB per GPU and
whether it fits, the time for the planned samples), and returns all of it as a dict.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
from safetensors import safe_open

from vlsi_ray import scale
from vlsi_ray.config import RunConfig
from vlsi_ray.data.collate import ChatCollator
from vlsi_ray.data.fingerprint import processor_fingerprint
from vlsi_ray.data.index import measure_rows, needs_measuring
from vlsi_ray.method.loop import total_optimizer_steps
from vlsi_ray.models.backbone import ModelInfo
from vlsi_ray.prepare import LoadSettings, check_pair, model_info
from vlsi_ray.recipe.stages import planned

#: Train rows collated for the length histogram (spread over the shards).
SAMPLE_ROWS = 256


def dry_run(cfg: RunConfig, sample_rows: int = SAMPLE_ROWS) -> dict:
    """Check ``cfg``'s models, pair and data without loading weights; print the plan; return it as a dict.

    Raises the same errors a run would (:class:`~vlsi_ray.models.backbone.IncompatibleModelsError`,
    ``FileNotFoundError`` for missing checkpoints or shards), before anything is written.
    """
    out: dict = {"run": cfg.name, "runner": cfg.runner, "steps": list(cfg.steps), "run_dir": str(cfg.run_dir)}
    print(f"[dry-run] config OK: run {cfg.name!r} -> {cfg.run_dir}, runner={cfg.runner}, steps={cfg.steps}", flush=True)
    infos = {role: _model(cfg, role, out) for role in ("teacher", "student")}
    if all(infos.values()):
        out["shared_vocab"] = check_pair(infos["teacher"], infos["student"])
        print(f"[dry-run] pair OK: one family, one tokenizer, same image tokens; KL over {out['shared_vocab']:,} vocabulary rows")
    out["data"] = _data(cfg, infos["student"], sample_rows)
    out["stages"] = _plan(cfg, out["data"])
    out["placement"] = _placement(cfg)
    if cfg.runner == "ray" and all(infos.values()):
        out["cost"] = _cost(cfg, out)
    print("[dry-run] nothing was loaded, trained or written; drop --dry-run to start the run", flush=True)
    return out


# ------------------------------------------------------------------------------------------ models
def _model(cfg: RunConfig, role: str, out: dict) -> ModelInfo | None:
    model = getattr(cfg, role)
    settings = LoadSettings.of(cfg, role)
    if model.path is None:
        tiny = model.tiny
        out[role] = {
            "tiny": True,
            "family": model.family,
            "num_layers": tiny.num_layers,
            "hidden_size": tiny.hidden_size,
            "targets": model.targets.resolve(tiny.num_layers),
        }
        print(
            f"[dry-run] {role}: tiny {model.family} {tiny.num_layers} x {tiny.hidden_size}, built offline and pretrained "
            f"by the run; target layers {out[role]['targets']}"
        )
        return None
    info = model_info(model.path, settings)
    params, stored = _parameters(Path(model.path))
    saved = info.checkpoint_dtype
    dtype = (
        model.dtype
        if model.dtype != "auto"
        else f"auto (bfloat16 on CUDA, {str(saved).removeprefix('torch.') if saved else 'float32'} on CPU)"
    )
    targets = model.targets.resolve(info.num_layers)
    processor = {f: _plain(getattr(info.image_processor, f, None)) for f in info.spec.resolution_fields}
    out[role] = {
        "family": info.family,
        "path": model.path,
        "num_layers": info.num_layers,
        "hidden_size": info.hidden_size,
        "vocab_size": info.vocab_size,
        "parameters": params,
        "checkpoint_bytes": stored,
        "checkpoint_dtype": str(saved).removeprefix("torch.") if saved else None,
        "compute_dtype": dtype,
        "attn_implementation": model.attn_implementation,
        "gradient_checkpointing": model.gradient_checkpointing,
        "targets": targets,
        "image_processor": processor,
    }
    print(
        f"[dry-run] {role}: {info.family} from {model.path}: {info.num_layers} blocks x {info.hidden_size}, "
        f"{_amount(params, 1000, ('', 'K', 'M', 'B'))} parameters ({_amount(stored, 1024, (' B', ' KiB', ' MiB', ' GiB'))} stored, "
        f"{out[role]['checkpoint_dtype']}), vocabulary "
        f"{info.vocab_size:,}; computes in {dtype}, attention {model.attn_implementation}, gradient checkpointing "
        f"{'on' if model.gradient_checkpointing else 'off'}; {len(targets)} target layers {targets}; image processor {processor}"
    )
    return info


def _parameters(path: Path) -> tuple[int, int]:
    """Parameter count and bytes of a checkpoint, from the safetensors headers (no weight is read)."""
    files = sorted(path.glob("*.safetensors"))
    count = size = 0
    for file in files:
        with safe_open(str(file), "pt") as handle:
            for name in handle.keys():
                shape = handle.get_slice(name).get_shape()
                count += math.prod(shape)
        size += file.stat().st_size
    return count, size


def _amount(value: float, base: int, units: tuple[str, ...]) -> str:
    """``7.6e9`` -> ``7.6B`` (``base`` 1000) or ``15.2 GiB`` (1024): the largest unit under the value."""
    for unit in units[:-1]:
        if value < base:
            return f"{value:.3g}{unit}"
        value /= base
    return f"{value:.3g}{units[-1]}"


def _plain(value):
    if hasattr(value, "__dataclass_fields__"):
        return {k: v for k, v in vars(value).items() if v is not None}
    return value


# ------------------------------------------------------------------------------------------ data
def _data(cfg: RunConfig, student: ModelInfo | None, sample_rows: int) -> dict:
    data_dir = Path(cfg.data.dir)
    files = (
        {split: sorted(data_dir.glob(f"{split}-*.parquet")) for split in ("train", "val", "test")} if data_dir.is_dir() else {}
    )
    if not any(files.values()):
        syn = cfg.data.synthetic
        print(
            f"[dry-run] data: {data_dir} has no shards; the run would generate the synthetic task "
            f"({syn.train}/{syn.val}/{syn.test} rows)"
        )
        return {"dir": str(data_dir), "synthetic": True, "rows": {"train": syn.train, "val": syn.val, "test": syn.test}}
    rows = {split: sum(pq.ParquetFile(f).metadata.num_rows for f in paths) for split, paths in files.items()}
    tasks = Counter()
    for path in files["train"]:
        tasks.update(pq.read_table(path, columns=["task"]).column("task").to_pylist())
    out = {"dir": str(data_dir), "synthetic": False, "rows": rows, "train_tasks": dict(tasks)}
    print(
        f"[dry-run] data: {data_dir}: {rows['train']:,} train / {rows['val']:,} val / {rows['test']:,} test rows "
        f"in {sum(len(p) for p in files.values())} shards; train tasks {dict(tasks)}"
    )
    if student is None:
        print("[dry-run] data: token lengths need the tiny tokenizer, which the run trains on the data first; skipped")
        return out
    out["lengths"] = _lengths(cfg, student, files["train"], rows["train"], sample_rows)
    return out


def _sample(files: list[Path], wanted: int) -> list[dict]:
    """Up to ``wanted`` rows, as evenly as the shards allow (the first rows of each)."""
    per_file = max(1, -(-wanted // max(1, len(files))))
    rows: list[dict] = []
    for path in files:
        for batch in pq.ParquetFile(path).iter_batches(batch_size=per_file):
            rows += batch.to_pylist()
            break
        if len(rows) >= wanted:
            break
    return rows[:wanted]


def _lengths(cfg: RunConfig, student: ModelInfo, files: list[Path], total: int, sample_rows: int) -> dict:
    """Token lengths (image tokens included) of the train rows and how many ``data.max_length`` leaves out: every
    row's count from the shards when jobs/prepare_data.py measured them with this student's processor, else
    those of a sample measured now (as the run will measure every row)."""
    fingerprint = processor_fingerprint(cfg.student.path, cfg.images.min_pixels, cfg.images.max_pixels)
    problems: Counter = Counter()
    if cfg.student.path is not None and not needs_measuring(cfg.data.dir, fingerprint):
        lengths = [
            n for n in pq.read_table([str(f) for f in files], columns=["tokens"]).column("tokens").to_pylist() if n is not None
        ]
        what = f"all {len(lengths):,} train rows (counted by jobs/prepare_data.py)"
    else:
        collator = ChatCollator(student.tokenizer, student.image_processor, student.family, max_length=None)
        lengths = []
        for result in measure_rows(_sample(files, sample_rows), collator):
            if result["problem"] is not None:
                problems[result["problem"].split(";")[0]] += 1
            else:
                lengths.append(result["tokens"])
        what = f"{len(lengths) + sum(problems.values())} sampled train rows"
    n = len(lengths) + sum(problems.values())
    scale = total / max(1, n)
    over = sum(1 for length in lengths if length > cfg.data.max_length)
    print(f"[dry-run] token lengths of {what} (image tokens included; data.max_length={cfg.data.max_length}):")
    for line in histogram(lengths, cfg.data.max_length):
        print("    " + line)
    if over:
        print(
            f"[dry-run]   {over} of {n} ({100 * over / n:.1f}%, ~{over * scale:,.0f} of {total:,} train rows) are over max_length: "
            f"bad rows, skipped and counted, or refused (data.on_error={cfg.data.on_error}); raise data.max_length to keep them"
        )
    for problem, count in problems.most_common():
        print(
            f"[dry-run]   {count} of {n} rows are bad ({problem}): skipped and counted, or refused (data.on_error={cfg.data.on_error})"
        )
    if not (problems or over):
        print(f"[dry-run]   every row fits in max_length={cfg.data.max_length}")
    return {
        "measured": n,
        "min": min(lengths, default=0),
        "max": max(lengths, default=0),
        "mean": sum(lengths) / max(1, len(lengths)),
        "over_max_length": over,
        "bad": dict(problems),
        "estimated_over_max_length": round(over * scale),
    }


def histogram(lengths: list[int], max_length: int, bins: int = 8, width: int = 40) -> list[str]:
    """Text histogram of ``lengths``: ``bins`` equal bins up to ``max_length``, one bin beyond it."""
    if not lengths:
        return ["(no usable rows)"]
    step = max(1, -(-max_length // bins))
    edges = [(i * step, min((i + 1) * step, max_length)) for i in range(bins) if i * step < max_length]
    counts = [sum(lo < n <= hi or (lo == 0 and n == 0) for n in lengths) for lo, hi in edges]
    labels = [f"{lo + 1:>6}-{hi:<6}" for lo, hi in edges]
    over = sum(n > max_length for n in lengths)
    counts.append(over)
    labels.append(f"{'>' + str(max_length):>13}")
    most = max(counts) or 1
    return [f"{label} | {'#' * round(width * c / most):<{width}} {c}" for label, c in zip(labels, counts)]


# ------------------------------------------------------------------------------------------ plan
def _plan(cfg: RunConfig, data: dict) -> list[dict]:
    """The stage table's rows this run trains: rows, workers, optimizer steps, samples and learning rates."""
    train_rows, tasks = data["rows"]["train"], data.get("train_tasks", {})
    stages = []
    print("[dry-run] stages:")
    for row in planned(cfg):
        # On Ray the student's stages run on Train workers (train.workers_for); the teacher's in one replica or task.
        student = cfg.runner == "ray" and row.side == "student" and not row.name.startswith("pretrain_")
        workers = cfg.train.workers_for(row.name)[0] if student else 1
        opt = getattr(cfg.stages, row.settings)
        rows = sum(tasks.get(t, 0) for t in opt.tasks) if opt.tasks and tasks else train_rows
        steps = total_optimizer_steps(opt, rows, workers)
        batch = opt.batch_size * opt.grad_accum * workers
        stages.append(
            {
                "stage": row.name,
                "trains": row.trains,
                "rows": rows,
                "workers": workers,
                "global_batch": batch,
                "optimizer_steps": steps,
                "samples": steps * batch,
                "lr": opt.lr,
                "min_lr": opt.min_lr,
                "warmup_steps": opt.warmup_steps,
                "seed": row.seed(cfg.seed),
            }
        )
        print(
            f"    {row.name:<18} {steps:>7,} steps x {batch:>4} rows ({opt.batch_size} x {opt.grad_accum} x {workers} workers) "
            f"= {steps * batch:>10,} samples of {rows:,}; lr {opt.lr:g} -> {opt.min_lr:g} (cosine, {opt.warmup_steps} warm-up); "
            f"trains {row.trains}"
        )
    return stages


# ------------------------------------------------------------------------------------------ cost
#: Assumed shares of a sample's tokens (the paper's data: about 30% response); the lengths are measured.
RESPONSE_SHARE, IMAGE_SHARE = 0.3, 0.5


def _cost(cfg: RunConfig, out: dict) -> dict:
    """:mod:`vlsi_ray.scale`'s estimate of this run on 8-GPU A100 and H100 machines at 40% MFU: each
    step's bottleneck, samples/s and GiB per GPU, and the days for the planned samples."""
    teacher, student = (scale.ModelShape.from_checkpoint(getattr(cfg, role).path) for role in ("teacher", "student"))
    tokens = max(2, round(out["data"].get("lengths", {}).get("mean") or cfg.data.max_length))
    work = scale.Workload(
        tokens=tokens, response=max(1, round(RESPONSE_SHARE * tokens)), image_tokens=round(IMAGE_SHARE * tokens)
    )
    samples = {stage["stage"]: stage["samples"] for stage in out["stages"]}
    layout = scale.layout_of(cfg)
    result = {}
    print(
        f"[dry-run] cost model (bench/scale.py): {tokens:,} tokens a sample (the train rows' mean; "
        f"{RESPONSE_SHARE:.0%} response and {IMAGE_SHARE:.0%} image tokens assumed), 40% MFU, this layout ({layout.split} GPUs):"
    )
    for name, gpu in scale.GPUS.items():
        days, steps = 0.0, {}
        for stage in scale.stage_costs(teacher, student, cfg, layout, gpu, work):
            planned = max((n for key, n in samples.items() if key.split("/")[0] == stage.name), default=0)
            days += planned / stage.rate / 86400
            worst = max(stage.sides, key=lambda side: side.peak_bytes)
            steps[stage.name] = {
                "bottleneck": stage.bottleneck,
                "samples_per_s": stage.rate,
                "max_gib_per_gpu": worst.peak_bytes / scale.GiB,
                "fits": all(side.fits(gpu) for side in stage.sides),
            }
        result[name] = {"days": days, "steps": steps}
        print(
            f"    {gpu.name}: {_duration(days * 86400)}; "
            + "; ".join(
                f"{stage} {s['samples_per_s']:.3g} samples/s ({s['bottleneck']}-bound), up to {s['max_gib_per_gpu']:.1f} GiB/GPU"
                + ("" if s["fits"] else " DOES NOT FIT")
                for stage, s in steps.items()
            )
        )
    return result


def _duration(seconds: float) -> str:
    """``12.3 days``, ``4.5 h`` or ``67 s``."""
    if seconds >= 86400:
        return f"{seconds / 86400:.1f} days"
    return f"{seconds / 3600:.1f} h" if seconds >= 3600 else f"{seconds:.0f} s"


def _worker_bundle(res, use_gpu) -> dict:
    """What one Train worker asks Ray for (``res``: a ``ResourcesConfig``); a GPU unless ``use_gpu`` is false."""
    bundle = {"CPU": res.num_cpus, **res.resources}
    if use_gpu is not False:
        bundle["GPU"] = res.num_gpus or (1 if use_gpu else 0)
    return bundle


def _placement(cfg: RunConfig) -> dict:
    if cfg.runner == "local":
        print(f"[dry-run] placement: everything in this process on device={cfg.device}")
        return {"runner": "local", "device": cfg.device}
    pool, train = cfg.teacher_pool, cfg.train
    teacher = {"CPU": pool.resources.num_cpus, "GPU": pool.resources.num_gpus, **pool.resources.resources}
    worker = _worker_bundle(train.resources_per_worker, train.use_gpu)
    live = "interact" in cfg.steps and cfg.teacher.source == "live"
    gpus = pool.replicas * pool.resources.num_gpus * ("verbalize" in cfg.steps or live) + train.num_workers * worker.get("GPU", 0)
    sft_run = bool(train.sft_workers) and ("sft" in cfg.steps or cfg.baseline_sft)
    sft_worker = _worker_bundle(train.sft_resources_per_worker, train.use_gpu)
    out = {
        "runner": "ray",
        "teacher_replicas": pool.replicas,
        "tensor_parallel": pool.tensor_parallel,
        "teacher_bundle": teacher,
        "placement_strategy": pool.placement_strategy,
        "train_workers": train.num_workers,
        "worker_bundle": worker,
        "deepspeed_stage": train.deepspeed_stage,
        "sft_workers": train.sft_workers if sft_run else train.num_workers,
        "gpus_at_once": max(gpus, train.sft_workers * sft_worker.get("GPU", 0) if sft_run else 0),
        "teacher_source": cfg.teacher.source,
    }
    print(
        f"[dry-run] placement (Ray): teacher pool {pool.replicas} x {json.dumps(teacher)}"
        f"{f' (each {pool.tensor_parallel} tensor-parallel ranks on one node)' if pool.tensor_parallel > 1 else ''} ({pool.placement_strategy}; "
        f"step 1's teacher side{' and step 2' if live else ''}{'' if live else ', step 2 reads the teacher cache'}); "
        f"student: Ray Train {train.num_workers} x {json.dumps(worker)}, "
        f"{'DeepSpeed ZeRO-' + str(train.deepspeed_stage) if train.deepspeed_stage else 'data parallel (all-reduce)'}; "
        f"{f'SFT stages then in a Train run of their own: {train.sft_workers} x {json.dumps(sft_worker)}; ' if sft_run else ''}"
        f"{out['gpus_at_once']:g} GPUs at once at most; evaluations {cfg.eval_tasks} task(s) per model on the workers' resources"
    )
    return out
