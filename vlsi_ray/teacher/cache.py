"""Build the offline teacher cache: Ray Data over the train shards, the teacher in Ray Data actors.

:func:`build_cache` reads the indexed train split (:func:`vlsi_ray.data.ray_dataset.train_split`),
keeps step 2's tasks, and maps batches through :class:`CacheSignals`: an actor class holding a
:class:`~vlsi_ray.runners.ray.teacher_pool.TeacherWorker` (the same teacher code as the live pool) placed
with ``teacher_pool``'s resources, ``teacher_pool.replicas`` of them. Each batch is collated with
the student's collator, exactly as step 2 collates it, and split into one row per sample
(:func:`vlsi_ray.signals.cache.signal_rows`). Ray Data writes the rows as Parquet; the manifest
is written last, so a cache without one is incomplete and is rebuilt.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray

from vlsi_ray.config import ConfigError, RunConfig, config_from_yaml, to_yaml
from vlsi_ray.data.index import measure_on_ray_or_here
from vlsi_ray.data.ray_dataset import train_split
from vlsi_ray.data.shards import shard_files
from vlsi_ray.method.steps import response_token_counts
from vlsi_ray.models.verbalizer import CONFIG_FILE as VERBALIZERS_CONFIG
from vlsi_ray.prepare import LoadSettings, check_pair_paths, index_splits, make_collator, model_info
from vlsi_ray.recipe.layout import RunLayout
from vlsi_ray.recipe.stages import stage
from vlsi_ray.runners.ray.teacher_pool import TeacherWorker
from vlsi_ray.runners.ray.wire import encode_batch
from vlsi_ray.signals.cache import FORMAT_VERSION, MANIFEST, TeacherCache, cache_spec, load_manifest, signal_rows

#: Rows per Parquet row group: the unit :class:`~vlsi_ray.signals.cache.TeacherCache` reads.
ROW_GROUP_ROWS = 256


def step2_inputs(cfg: RunConfig) -> dict[str, Path]:
    """The teacher, its step-1 verbalizers and the student base of ``cfg``'s run (what step 2 uses).

    Raises ``FileNotFoundError`` naming what is missing and the command that makes it.
    """
    layout = RunLayout(cfg.run_dir)
    found = {
        "teacher": Path(cfg.teacher.path) if cfg.teacher.path else layout.model("pretrain_teacher"),
        "student": Path(cfg.student.path) if cfg.student.path else layout.model("pretrain_student"),
        "teacher_verbalizers": layout.verbalizers("teacher"),
    }
    for what, path in found.items():
        if not path.is_dir():
            raise FileNotFoundError(
                f"the teacher cache needs the run's {what.replace('_', ' ')} in {path}, which does not exist; run "
                "`python jobs/distill.py steps=[pretrain_teacher,pretrain_student,verbalize]` with the same config first."
            )
    return found


class CacheSignals:
    """Ray Data actor: one teacher replica turning batches of train rows into per-sample cache rows."""

    def __init__(self, cfg_yaml: str, teacher_dir: str, verbalizer_dir: str, student_dir: str, vocab: int):
        cfg = config_from_yaml(cfg_yaml)
        self.collate = make_collator(model_info(student_dir, LoadSettings.of(cfg, "student")), cfg)
        self.worker = TeacherWorker(
            teacher_dir,
            verbalizer_dir,
            cfg.signal.topk,
            cfg.loss.kd_temperature,
            vocab,
            cfg.signal.storage,
            cfg.device,
            tail_samples=cfg.signal.tail_samples,
            seed=stage("interact").seed(cfg.seed),
            load=LoadSettings.of(cfg, "teacher"),
        )

    def __call__(self, rows: dict[str, np.ndarray]) -> pa.Table:
        """Columns of ``B`` train rows -> ``B`` cache rows (``id``, ``tokens`` and the signal's arrays)."""
        batch = self.collate(rows)
        counts = response_token_counts(batch["labels"])
        encoded = self.worker.signal(encode_batch(batch))
        return signal_rows(encoded, encoded["ids"], counts)


def build_cache(cfg: RunConfig, overwrite: bool = False) -> dict:
    """Write the teacher cache of ``cfg``'s run to ``cfg.teacher_cache``; returns its manifest.

    A complete cache with the same spec is kept unless ``overwrite``; an incomplete one or one with
    another spec is replaced. Needs a running Ray (``ray.init``) and the run's step-1 outputs.
    """
    inputs = step2_inputs(cfg)
    vocab = check_pair_paths(inputs["teacher"], inputs["student"], cfg)
    files = shard_files(cfg.data.dir, "train")
    spec = cache_spec(
        cfg, inputs["teacher"], inputs["teacher_verbalizers"], inputs["student"], vocab, files, stage("interact").seed(cfg.seed)
    )
    out = cfg.teacher_cache
    if (out / MANIFEST).is_file() and not overwrite:
        old = json.loads((out / MANIFEST).read_text())
        if old.get("spec") == spec:
            print(f"[teacher_cache] {out} is complete and matches this run; nothing to do (--overwrite rebuilds it)", flush=True)
            return old
    if out.exists():
        shutil.rmtree(out)
    started = time.perf_counter()
    _write_signals(cfg, inputs, vocab, out / "shards")
    manifest = _manifest(cfg, inputs, vocab, spec, out, time.perf_counter() - started)
    print(
        f"[teacher_cache] {manifest['rows']} rows, {manifest['bytes'] / 2**20:.1f} MiB in {len(manifest['files'])} file(s), "
        f"{manifest['seconds']:.0f}s; step 2 reads it with teacher.source=cache",
        flush=True,
    )
    return manifest


def _write_signals(cfg: RunConfig, inputs: dict[str, Path], vocab: int, shards: Path) -> None:
    """Map step 2's train rows through ``teacher_pool.replicas`` :class:`CacheSignals` actors into Parquet at ``shards``."""
    collator = make_collator(model_info(inputs["student"], LoadSettings.of(cfg, "student")), cfg)
    index = index_splits(
        cfg,
        inputs["student"],
        lambda files: measure_on_ray_or_here(files, collator, cfg.data.measure_in_driver_mb),
        splits=("train",),
    )["train"]
    split = train_split(cfg.data.dir, index.excluded(), cfg.data.sort_in_memory_mb)
    dataset = split.dataset
    tasks = set(cfg.stages.interact.tasks)
    if tasks:
        dataset = dataset.filter(lambda row: row["task"] in tasks)
    pool, res = cfg.teacher_pool, cfg.teacher_pool.resources
    args = (to_yaml(cfg), str(inputs["teacher"]), str(inputs["teacher_verbalizers"]), str(inputs["student"]), vocab)
    # Ray Data restarts a dead actor and retries its batches itself.
    signals = dataset.map_batches(
        CacheSignals, fn_constructor_args=args, batch_size=cfg.stages.interact.batch_size, batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=pool.replicas), num_cpus=res.num_cpus, num_gpus=res.num_gpus or None,
        resources=dict(res.resources) or None,
    )  # fmt: skip
    print(
        f"[teacher_cache] writing the teacher signal of {split.num_files} train shard(s) to {shards} "
        f"({pool.replicas} teacher replica(s), top-{cfg.signal.topk}, {cfg.signal.tail_samples} tail samples)",
        flush=True,
    )
    signals.write_parquet(str(shards), min_rows_per_file=ROW_GROUP_ROWS * 8, row_group_size=ROW_GROUP_ROWS)


def _manifest(cfg: RunConfig, inputs: dict[str, Path], vocab: int, spec: dict, out: Path, seconds: float) -> dict:
    """Count what :func:`_write_signals` wrote under ``out`` and write ``manifest.json`` last (atomically):
    a cache without one is incomplete."""
    files = sorted(p.relative_to(out).as_posix() for p in (out / "shards").glob("*.parquet"))
    rows = sum(pq.ParquetFile(out / name).metadata.num_rows for name in files)
    layers = len(json.loads((inputs["teacher_verbalizers"] / VERBALIZERS_CONFIG).read_text())["layers"]) + 1
    manifest = {
        "format": FORMAT_VERSION, "spec": spec, "rows": rows, "files": files, "layers": layers, "k": min(cfg.signal.topk, vocab),
        "bytes": sum(os.path.getsize(out / name) for name in files), "seconds": round(seconds, 1),
        "teacher_dir": str(inputs["teacher"]), "teacher_verbalizers": str(inputs["teacher_verbalizers"]),
    }  # fmt: skip
    tmp = out / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2))
    os.replace(tmp, out / MANIFEST)
    return manifest


def require_cache(cfg: RunConfig) -> None:
    """Before any work: a run whose step 2 will read the teacher cache needs one (:class:`ConfigError` if absent)."""
    step2_done = RunLayout(cfg.run_dir).finished("interact")
    if cfg.teacher.source != "cache" or "interact" not in cfg.steps or step2_done:
        return
    try:
        load_manifest(cfg.teacher_cache)
    except FileNotFoundError as err:
        raise ConfigError(str(err)) from None


def open_cache(cfg: RunConfig, teacher_dir: str | Path, student_dir: str | Path, verbalizer_dir: str | Path, vocab: int):
    """Step 2's teacher when ``teacher.source=cache``: the run's cache, checked against this run's spec."""
    spec = cache_spec(
        cfg, teacher_dir, verbalizer_dir, student_dir, vocab, shard_files(cfg.data.dir, "train"), stage("interact").seed(cfg.seed)
    )
    cache = TeacherCache(cfg.teacher_cache, spec)
    print(
        f"[interact] teacher signal from the cache in {cache.dir} ({cache.manifest['rows']} rows, "
        f"{cache.manifest['bytes'] / 2**20:.1f} MiB): no teacher forward in step 2",
        flush=True,
    )
    return cache
