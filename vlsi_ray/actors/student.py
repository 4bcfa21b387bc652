"""The student side on Ray Train: one train loop for every stage, fed by Ray Data.

:func:`train_student` is the ``train_loop_per_worker`` of a ``TorchTrainer``; one Train run holds
the student's whole chain of stages (the SFT baseline, its side of step 1, step 2, step 3), so the
run's start-up (seven actor processes, ~40 CPU-seconds on 2 cores) is paid once. For each stage it
rebuilds the objective from :mod:`vlsi_ray.method.steps` (the same objects the in-process runner
uses), reads the stage's Ray Dataset, and runs :func:`vlsi_ray.method.loop.run_steps`. For step 2
the teacher is a :class:`TeacherClient` over the teacher actors, pipelined with ``lookahead``.
Every ``train.checkpoint_every`` steps each rank reports a checkpoint tagged with its stage,
holding the trainable weights (LoRA, verb-FFNs or the fine-tuned LLM), the optimizer, the matching
RNG and the step; the data position is ``step × grad_accum`` batches, so a restarted or re-run
stage skips exactly what it consumed. A finished stage leaves its summary at ``done_path``
(written after its outputs) and is skipped from then on. The teacher is never in a checkpoint.
"""

from __future__ import annotations

import itertools
import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

STATE_FILE = "train_state.rank{rank}.pt"  # one per rank: ZeRO optimizer state is partitioned
TAG_FILE = "stage.json"  # in every checkpoint: the stage that wrote it


@dataclass
class StageSpec:
    """Everything a Train worker needs for one stage (pickled into ``train_loop_config``).

    ``kind``: ``sft`` (cross-entropy; pretraining, step 3, the SFT-only baseline), ``verbalize``
    (step 1, student side) or ``interact`` (step 2). ``settings`` names the ``stages.*`` entry.
    """

    stage: str
    kind: str
    settings: str
    cfg_yaml: str
    model_dir: str
    out_dir: str
    metrics_path: str
    seed: int
    total_steps: int
    done_path: str  # the stage's summary JSON, written by rank 0 once its outputs are saved
    verbalizer_dir: str | None = None
    lora: bool = False
    groups: list[str] | None = None
    teacher: object = None  # TeacherClient for step 2
    vocab: int | None = None
    model_out: str | None = None  # where rank 0 saves the trained model (LoRA merged)
    verbalizers_out: str | None = None  # where rank 0 saves the trained verb-FFNs


class StageObjective:
    """The objective of one stage plus the modules whose trainable weights a checkpoint holds."""

    def __init__(self, spec: StageSpec, cfg, backbone, device: torch.device):
        from vlsi_ray.method.steps import InteractionObjective, SFTObjective, VerbalizationObjective
        from vlsi_ray.models.verbalizer import Verbalizers
        from vlsi_ray.prepare import new_verbalizers

        self.backbone = backbone
        self.verbalizers = None
        self.generator = torch.Generator().manual_seed(spec.seed)
        if spec.lora:
            torch.manual_seed(spec.seed)  # LoRA's random A matrices: the same as the in-process runner's
            backbone.apply_lora(cfg.lora.rank, cfg.lora.alpha, cfg.lora.dropout)
        if spec.kind == "sft":
            self.objective = SFTObjective(backbone, spec.groups, cfg.loss.chunk_size)
        elif spec.kind == "verbalize":
            self.verbalizers = new_verbalizers(cfg, "student", backbone, spec.seed)
            self.objective = VerbalizationObjective(backbone, self.verbalizers, cfg.loss.chunk_size)
        elif spec.kind == "interact":
            self.verbalizers = Verbalizers.load(spec.verbalizer_dir, device)
            self.objective = InteractionObjective(
                backbone, self.verbalizers, spec.teacher, cfg.matching, self.generator, cfg.loss.direction,
                cfg.loss.kd_temperature, cfg.loss.last_layer, cfg.loss.chunk_size, spec.vocab,
                intermediate=cfg.loss.intermediate,
            )
        else:
            raise ValueError(f"unknown stage kind {spec.kind!r}; use sft, verbalize or interact.")
        self.modules: dict[str, nn.Module] = {"model": backbone.model}
        if self.verbalizers is not None:
            self.modules["verbalizers"] = self.verbalizers

    def _trainable(self) -> dict[str, nn.Parameter]:
        return {f"{m}/{n}": p for m, module in self.modules.items() for n, p in module.named_parameters() if p.requires_grad}

    def all_parameters(self) -> list[nn.Parameter]:
        """Every parameter of the stage's modules (ZeRO-3 gathers them all for the final save)."""
        return [p for module in self.modules.values() for p in module.parameters()]

    def trainable_state(self, stepper) -> dict[str, torch.Tensor]:
        """Copies of every trainable tensor, keyed ``<module>/<parameter name>`` (gathered whole under ZeRO-3)."""
        params = self._trainable()
        with stepper.gathered(params.values()):
            return {key: p.detach().cpu().clone() for key, p in params.items()}

    def load_trainable_state(self, state: dict[str, torch.Tensor], stepper) -> None:
        """Copy a :meth:`trainable_state` back into the parameters (names must match exactly)."""
        params = self._trainable()
        if params.keys() != state.keys():
            raise ValueError("the checkpoint's trainable parameters do not match this stage's; was it written by another stage or config?")
        with stepper.gathered(params.values(), modify=True), torch.no_grad():
            for key, p in params.items():
                p.copy_(state[key].to(p.device))

    def save_outputs(self, spec: StageSpec) -> None:
        """Rank 0 writes the stage's result: the model (LoRA merged, in the base checkpoint's dtype) and/or its verbalizers."""
        if spec.model_out is not None:
            if self.backbone.lora_active:
                self.backbone.merge_lora()
            self.backbone.save_pretrained(spec.model_out)  # float32 masters cast to the base checkpoint's dtype
        if spec.verbalizers_out is not None and self.verbalizers is not None:
            self.verbalizers.save(spec.verbalizers_out)


def _make_stepper(parameters, opt, train_cfg, modules: dict[str, nn.Module], dtype: torch.dtype):
    from vlsi_ray.method.loop import Stepper

    if train_cfg.deepspeed_stage:
        from vlsi_ray.actors.deepspeed import DeepSpeedStepper

        return DeepSpeedStepper(parameters, opt, train_cfg.deepspeed_stage, modules, dtype=dtype)
    return Stepper(parameters, opt, dtype)


def _batches(shard, collate, batch_size: int, skip: int) -> Iterator[dict]:
    from vlsi_ray.data.ray_dataset import RayCollate

    it = iter(shard.iter_torch_batches(batch_size=batch_size, collate_fn=RayCollate(collate), drop_last=True))
    for _ in range(skip):  # resume: the batches the checkpoint already trained on
        next(it)
    yield from it


def dataset_name(stage: str) -> str:
    """The Train run's dataset key of ``stage`` (its rows in that stage's order)."""
    return stage.replace("/", "-")


def train_student(config: dict) -> None:
    """``train_loop_per_worker``: run ``config["specs"]`` (:class:`StageSpec` list) in order on this worker.

    A stage whose ``done_path`` exists is skipped. The run's latest checkpoint resumes the stage that
    wrote it, so a restarted worker skips the finished stages and continues the interrupted one.
    """
    import ray.train

    from vlsi_ray.env import set_offline_defaults

    set_offline_defaults()
    checkpoint = ray.train.get_checkpoint()
    tag = None
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            tag = json.loads((Path(d) / TAG_FILE).read_text())["stage"]
    for spec in config["specs"]:
        if Path(spec.done_path).is_file():
            continue
        _train_stage(spec, checkpoint if tag == spec.stage else None, fresh_run=checkpoint is None)
        _barrier()  # the next stage may load what rank 0 just saved


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def _train_stage(spec: StageSpec, checkpoint, fresh_run: bool) -> None:
    """One stage on this worker, from ``checkpoint`` (one this stage wrote) or from the start.

    ``fresh_run``: the Train run has no checkpoint at all (``train.fail_at_step`` fires only then).
    """
    import ray.train
    import ray.train.torch

    from vlsi_ray.config import config_from_yaml
    from vlsi_ray.method.loop import run_steps
    from vlsi_ray.metrics import MetricsWriter, last_attempt, read_metrics, write_stage_summary
    from vlsi_ray.prepare import LoadSettings, load_model, make_collator
    from vlsi_ray.tracking import Tracker

    started = time.perf_counter()
    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    device = ray.train.torch.get_device()
    torch.manual_seed(spec.seed + rank)
    cfg = config_from_yaml(spec.cfg_yaml)
    opt = getattr(cfg.stages, spec.settings)
    backbone = load_model(spec.model_dir, LoadSettings.of(cfg, "student"), device)
    stage = StageObjective(spec, cfg, backbone, device)
    stepper = _make_stepper(stage.objective.parameters(), opt, cfg.train, stage.modules, stage.objective.compute_dtype)

    start = 0
    if checkpoint is not None:
        world = ctx.get_world_size()
        with checkpoint.as_directory() as d:
            wanted = range(world) if stepper.needs_every_rank_state else [rank]
            states: list = [None] * world
            for r in wanted:
                path = Path(d) / STATE_FILE.format(rank=r)
                if not path.is_file():
                    raise RuntimeError(f"checkpoint {checkpoint.path} has no state for rank {r}; resume with the same train.num_workers.")
                states[r] = torch.load(path, weights_only=False)
        state = states[rank]
        stage.load_trainable_state(state["trainable"], stepper)
        stepper.load_rank_states([s["optimizer"] if s is not None else None for s in states], rank)
        stage.generator.set_state(state["generator"])
        start = state["step"]
        if rank == 0:
            print(f"[{spec.stage}] resuming after step {start} from {checkpoint.path}", flush=True)

    shard = ray.train.get_dataset_shard(dataset_name(spec.stage))
    batches = _batches(shard, make_collator(backbone, cfg), opt.batch_size, start * opt.grad_accum)
    batches = itertools.islice(batches, (spec.total_steps - start) * opt.grad_accum)  # no teacher request past the end
    teacher = spec.teacher
    if teacher is not None:
        teacher.start_at(rank)
        batches = teacher.pipelined(batches)
    if cfg.train.log_ids:
        batches = _audit(batches, Path(spec.out_dir) / f"consumed_ids.{dataset_name(spec.stage)}.rank{rank}.jsonl")
    _write_placement(Path(spec.out_dir) / f"placement.{dataset_name(spec.stage)}.rank{rank}.json", device)
    writer = MetricsWriter(spec.metrics_path) if rank == 0 else None
    tracker = Tracker(cfg.ray.logger if rank == 0 else "none", Path(spec.metrics_path).parent, cfg.name, spec.stage,
                      {"stage": spec.stage, "settings": spec.settings, "workers": ctx.get_world_size()})
    window = {"started": time.perf_counter(), "step": start, "wait": 0.0, "bytes": 0}

    def teacher_metrics() -> dict:
        """The teacher wait and signal bytes of the step just done (the client counts cumulatively)."""
        counters = teacher.counters()
        out = {"teacher_wait_s": counters["teacher_wait_s"] - window["wait"],
               "signal_bytes": counters["signal_bytes"] - window["bytes"]}
        window["wait"], window["bytes"] = counters["teacher_wait_s"], counters["signal_bytes"]
        return out

    def after_step(step: int, record: dict) -> None:
        tracker.log(record, step)
        if cfg.train.fail_at_step == step and fresh_run:
            raise RuntimeError(f"injected failure after step {step} (train.fail_at_step={step})")
        last = step == spec.total_steps
        save = last or (cfg.train.checkpoint_every and step % cfg.train.checkpoint_every == 0)
        if not (save or step % cfg.train.report_every == 0):
            return
        elapsed = time.perf_counter() - window["started"]
        metrics = {k: v for k, v in record.items() if isinstance(v, (int, float))}
        metrics["global_samples_per_s"] = (step - window["step"]) * opt.batch_size * opt.grad_accum * ctx.get_world_size() / max(elapsed, 1e-9)
        window["started"], window["step"] = time.perf_counter(), step
        if save:
            with tempfile.TemporaryDirectory() as tmp:
                torch.save({"trainable": stage.trainable_state(stepper), "optimizer": stepper.state_dict(),
                            "generator": stage.generator.get_state(), "step": step}, Path(tmp) / STATE_FILE.format(rank=rank))
                (Path(tmp) / TAG_FILE).write_text(json.dumps({"stage": spec.stage, "step": step}))
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
        else:
            ray.train.report(metrics)

    modules = list(stage.modules.values())
    run_steps(spec.stage, stepper.wrap(stage.objective), stepper, batches, opt, spec.total_steps, device, writer, modules,
              start_step=start, after_step=after_step, verbose=rank == 0,
              step_metrics=teacher_metrics if teacher is not None else None)
    tracker.finish()
    with stepper.gathered(stage.all_parameters()):  # ZeRO-3: a collective, then rank 0 saves whole tensors
        if rank == 0:
            stage.save_outputs(spec)
    if rank == 0:
        if teacher is not None:
            print(f"[{spec.stage}] teacher: {json.dumps({k: round(v, 3) for k, v in teacher.counters().items()})}", flush=True)
        history = last_attempt(read_metrics(spec.metrics_path, spec.stage))
        write_stage_summary(spec.done_path, spec.stage, history, time.perf_counter() - started)


def _write_placement(path: Path, device: torch.device) -> None:
    """Record where this worker runs (node, device, GPU ids, pid): placement checks and debugging."""
    import os

    import ray

    path.parent.mkdir(parents=True, exist_ok=True)
    info = {"node_id": ray.get_runtime_context().get_node_id(), "device": str(device),
            "gpu_ids": [str(g) for g in ray.get_gpu_ids()], "pid": os.getpid()}
    path.write_text(json.dumps(info))


def _audit(batches: Iterator[dict], path: Path) -> Iterator[dict]:
    """Append each batch's row ids to ``path`` as it is handed to the loop (the exactly-once audit)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    for batch in batches:
        with path.open("a") as fh:
            fh.write(json.dumps([str(i) for i in batch["ids"]]) + "\n")
        yield batch
