"""The student side on Ray Train: one train loop for every stage, fed by Ray Data.

:func:`train_student` is the ``train_loop_per_worker`` of a ``TorchTrainer``; one Train run holds
the student's whole chain of stages (the SFT baseline, its side of step 1, step 2, step 3), so the
run's start-up (the controller, the workers and Ray Data's actors) is paid once. For each stage it
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
import os
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from signal import SIGKILL

import ray
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from torch import nn

from vlsi_ray.config import config_from_yaml
from vlsi_ray.data.ray_dataset import RayCollate
from vlsi_ray.env import set_offline_defaults
from vlsi_ray.method.loop import Stepper, run_steps
from vlsi_ray.metrics import MetricsWriter, last_attempt, read_metrics, write_stage_summary
from vlsi_ray.models.verbalizer import Verbalizers
from vlsi_ray.prepare import LoadSettings, load_model, make_collator, new_verbalizers
from vlsi_ray.recipe.layout import RunLayout
from vlsi_ray.recipe.stages import Stage, build_objective
from vlsi_ray.runners.ray.deepspeed import DeepSpeedStepper, needs_vision_filler
from vlsi_ray.tracking import Tracker

STATE_FILE = "train_state.rank{rank}.pt"  # one per rank: ZeRO optimizer state is partitioned
TAG_FILE = "stage.json"  # in every checkpoint: the stage that wrote it


@dataclass
class StageSpec:
    """Everything a Train worker needs for one stage (pickled into ``train_loop_config``).

    ``stage``: its row of the stage table (objective, settings, seed, what it writes); ``run_dir``:
    the run's layout root, where the outputs, the metrics and the marker go; ``model_dir``: the
    checkpoint it starts from; ``verbalizer_dir``: step 2's student verbalizers from step 1;
    ``teacher``: step 2's teacher source; ``vocab``: the shared vocabulary; ``lora``: train through LoRA.
    """

    stage: Stage
    cfg_yaml: str
    run_dir: str
    model_dir: str
    total_steps: int
    verbalizer_dir: str | None = None
    lora: bool = False
    teacher: object = None
    vocab: int | None = None

    @property
    def layout(self) -> RunLayout:
        return RunLayout(self.run_dir)

    @property
    def done_path(self) -> Path:
        """The stage's marker, written by rank 0 once its outputs are saved."""
        return self.layout.marker(self.stage.name)


class StageObjective:
    """The objective of one stage plus the modules whose trainable weights a checkpoint holds."""

    def __init__(self, spec: StageSpec, cfg, backbone, device: torch.device):
        row, seed = spec.stage, spec.stage.seed(cfg.seed)
        self.backbone = backbone
        self.verbalizers = None
        self.generator = torch.Generator().manual_seed(seed)
        if spec.lora:
            torch.manual_seed(seed)  # LoRA's random A matrices: the same as the in-process runner's
            backbone.apply_lora(cfg.lora.rank, cfg.lora.alpha, cfg.lora.dropout)
        if row.objective == "verbalize":
            self.verbalizers = new_verbalizers(cfg, "student", backbone, seed)
        elif row.objective == "interact":
            self.verbalizers = Verbalizers.load(spec.verbalizer_dir, device)
        self.objective = build_objective(
            row, cfg, backbone, verbalizers=self.verbalizers, teacher=spec.teacher, generator=self.generator, vocab=spec.vocab
        )
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
            raise ValueError(
                "the checkpoint's trainable parameters do not match this stage's; was it written by another stage or config?"
            )
        with stepper.gathered(params.values(), modify=True), torch.no_grad():
            for key, p in params.items():
                p.copy_(state[key].to(p.device))

    def save_outputs(self, spec: StageSpec) -> None:
        """Rank 0 writes the stage's result: the model (LoRA merged, in the base checkpoint's dtype) and/or its verbalizers."""
        row, layout = spec.stage, spec.layout
        if "model" in row.writes:
            if self.backbone.lora_active:
                self.backbone.merge_lora()
            self.backbone.save_pretrained(layout.model(row.name))  # float32 masters cast to the base checkpoint's dtype
        if "verbalizers" in row.writes:
            self.verbalizers.save(layout.verbalizers(row.side, row.name))


def _make_stepper(parameters, opt, train_cfg, modules: dict[str, nn.Module], dtype: torch.dtype):
    if train_cfg.deepspeed_stage:
        return DeepSpeedStepper(parameters, opt, train_cfg.deepspeed_stage, modules, dtype=dtype)
    return Stepper(parameters, opt, dtype)


def _batches(shard, collate, batch_size: int, skip: int) -> Iterator[dict]:
    it = iter(shard.iter_torch_batches(batch_size=batch_size, collate_fn=RayCollate(collate), drop_last=True))
    for _ in range(skip):  # resume: the batches the checkpoint already trained on
        next(it)
    yield from it


def dataset_name(stage: str) -> str:
    """The Train run's dataset key of ``stage`` (its rows in that stage's order)."""
    return stage.replace("/", "-")


def train_student(config: dict) -> None:
    """``train_loop_per_worker``: run ``config["specs"]`` (:class:`StageSpec` list) in order on this worker.

    A stage whose marker exists is skipped. The run's latest checkpoint resumes the stage that
    wrote it, so a restarted worker skips the finished stages and continues the interrupted one.
    """
    set_offline_defaults()
    checkpoint = ray.train.get_checkpoint()
    tag = None
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            tag = json.loads((Path(d) / TAG_FILE).read_text())["stage"]
    for spec in config["specs"]:
        if spec.done_path.is_file():
            continue
        _train_stage(spec, checkpoint if tag == spec.stage.name else None, fresh_run=checkpoint is None)
        _barrier()  # the next stage may load what rank 0 just saved


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def _train_stage(spec: StageSpec, checkpoint, fresh_run: bool) -> None:
    """One stage on this worker, from ``checkpoint`` (one this stage wrote) or from the start.

    ``fresh_run``: the Train run has no checkpoint at all (``train.fail_at_step`` fires only then).
    """
    started = time.perf_counter()
    name, layout = spec.stage.name, spec.layout
    rank, device = ray.train.get_context().get_world_rank(), ray.train.torch.get_device()
    cfg = config_from_yaml(spec.cfg_yaml)
    torch.manual_seed(spec.stage.seed(cfg.seed) + rank)
    opt = getattr(cfg.stages, spec.stage.settings)
    backbone = load_model(spec.model_dir, LoadSettings.of(cfg, "student"), device)
    stage = StageObjective(spec, cfg, backbone, device)
    stepper = _make_stepper(stage.objective.parameters(), opt, cfg.train, stage.modules, stage.objective.compute_dtype)
    start = _resume(stage, stepper, checkpoint, rank, name) if checkpoint is not None else 0
    batches = _stage_batches(spec, cfg, backbone, opt, start, rank)
    _write_placement(layout.worker_placement(name, rank), device)
    reporter = _Reporter(spec, cfg, opt, stage, stepper, start, rank, fresh_run)
    run_steps(
        name,
        stepper.wrap(stage.objective),
        stepper,
        batches,
        opt,
        spec.total_steps,
        device,
        MetricsWriter(layout.metrics) if rank == 0 else None,
        list(stage.modules.values()),
        start_step=start,
        after_step=reporter.after_step,
        verbose=rank == 0,
        step_metrics=reporter.teacher_metrics if spec.teacher is not None else None,
    )
    reporter.tracker.finish()
    with stepper.gathered(stage.all_parameters()):  # ZeRO-3: a collective, then rank 0 saves whole tensors
        if rank == 0:
            stage.save_outputs(spec)
    if rank == 0:
        if spec.teacher is not None:
            counters = spec.teacher.counters()
            summary = {k: round(v, 3) for k, v in counters.items() if k != "teacher_pids"}
            if "teacher_pids" in counters:  # a replica restarted after a failure answers from a new process
                summary["teacher_processes"] = len(counters["teacher_pids"])
            print(f"[{name}] teacher: {json.dumps(summary)}", flush=True)
        history = last_attempt(read_metrics(layout.metrics, name))
        write_stage_summary(spec.done_path, name, history, time.perf_counter() - started)


def _resume(stage: StageObjective, stepper, checkpoint, rank: int, name: str) -> int:
    """Restore trainable weights, optimizer state and matching RNG from ``checkpoint``; return its step."""
    world = ray.train.get_context().get_world_size()
    with checkpoint.as_directory() as d:
        wanted = range(world) if stepper.needs_every_rank_state else [rank]
        states: list = [None] * world
        for r in wanted:
            path = Path(d) / STATE_FILE.format(rank=r)
            if not path.is_file():
                raise RuntimeError(
                    f"checkpoint {checkpoint.path} has no state for rank {r}; resume with the same train.num_workers."
                )
            states[r] = torch.load(path, weights_only=False)
    state = states[rank]
    stage.load_trainable_state(state["trainable"], stepper)
    stepper.load_rank_states([s["optimizer"] if s is not None else None for s in states], rank)
    stage.generator.set_state(state["generator"])
    if rank == 0:
        print(f"[{name}] resuming after step {state['step']} from {checkpoint.path}", flush=True)
    return state["step"]


def _stage_batches(spec: StageSpec, cfg, backbone, opt, start: int, rank: int) -> Iterator[dict]:
    """The stage's collated batches from its Ray Data shard, past the ``start`` steps already trained,
    pipelined through the teacher (step 2) and audited (``train.log_ids``)."""
    shard = ray.train.get_dataset_shard(dataset_name(spec.stage.name))
    filler = needs_vision_filler(cfg.train.deepspeed_stage, ray.train.get_context().get_world_size())
    batches = _batches(shard, make_collator(backbone, cfg, vision_filler=filler), opt.batch_size, start * opt.grad_accum)
    batches = itertools.islice(batches, (spec.total_steps - start) * opt.grad_accum)  # no teacher request past the end
    if spec.teacher is not None:
        spec.teacher.start_at(rank)
        batches = spec.teacher.pipelined(batches)
    if cfg.train.log_ids:
        batches = _audit(batches, spec.layout.consumed_ids(spec.stage.name, rank))
    return batches


def _kill_this_worker(stage: str, step: int) -> None:
    """``train.fail_at_step``: a process death, as the OOM killer or a lost node causes. Ray Train's
    controller collects reported checkpoints at each health check, so a worker killed sooner than that
    after a report restarts from the checkpoint before; the drill waits two checks, which makes the
    restart point (the last checkpoint) deterministic."""
    interval = float(os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", 2.0))  # Ray Train's default: 2 s
    time.sleep(2 * interval + 0.5)
    print(f"[{stage}] train.fail_at_step={step}: killing this worker (pid {os.getpid()})", flush=True)
    os.kill(os.getpid(), SIGKILL)


class _Reporter:
    """After each step: tracking, the injected failure, ``ray.train.report`` every ``report_every``
    steps and a checkpoint every ``checkpoint_every`` (and at the end); per-step teacher metrics."""

    def __init__(self, spec: StageSpec, cfg, opt, stage: StageObjective, stepper, start: int, rank: int, fresh_run: bool):
        self.spec, self.cfg, self.opt, self.stage, self.stepper, self.rank, self.fresh_run = (
            spec,
            cfg,
            opt,
            stage,
            stepper,
            rank,
            fresh_run,
        )
        self.world = ray.train.get_context().get_world_size()
        name = spec.stage.name
        self.tracker = Tracker(
            cfg.ray.logger if rank == 0 else "none",
            spec.layout.root,
            cfg.name,
            name,
            {"stage": name, "settings": spec.stage.settings, "workers": self.world},
        )
        self.window_started, self.window_step = time.perf_counter(), start
        self.teacher_seen = {"teacher_wait_s": 0.0, "signal_bytes": 0}
        self.answers_seen: dict[int, int] = {}

    def teacher_metrics(self) -> dict:
        """The teacher wait and signal bytes of the step just done (the teacher source counts cumulatively),
        and from the teacher actors the pids of the replica processes that answered it (``teacher_pids``)."""
        counters = self.spec.teacher.counters()
        out = {key: counters[key] - seen for key, seen in self.teacher_seen.items()}
        self.teacher_seen = {key: counters[key] for key in self.teacher_seen}
        if "teacher_pids" in counters:
            answers = counters["teacher_pids"]
            out["teacher_pids"] = sorted(p for p, n in answers.items() if n > self.answers_seen.get(p, 0))
            self.answers_seen = answers
        return out

    def after_step(self, step: int, record: dict) -> None:
        cfg = self.cfg.train
        self.tracker.log(record, step)
        if cfg.fail_at_step == step and self.fresh_run:
            _kill_this_worker(self.spec.stage.name, step)
        save = step == self.spec.total_steps or (cfg.checkpoint_every and step % cfg.checkpoint_every == 0)
        if not (save or step % cfg.report_every == 0):
            return
        metrics = {k: v for k, v in record.items() if isinstance(v, (int, float))}
        rows = (step - self.window_step) * self.opt.batch_size * self.opt.grad_accum * self.world
        metrics["global_samples_per_s"] = rows / max(time.perf_counter() - self.window_started, 1e-9)
        self.window_started, self.window_step = time.perf_counter(), step
        if not save:
            ray.train.report(metrics)
            return
        with tempfile.TemporaryDirectory() as tmp:
            torch.save(
                {
                    "trainable": self.stage.trainable_state(self.stepper),
                    "optimizer": self.stepper.state_dict(),
                    "generator": self.stage.generator.get_state(),
                    "step": step,
                },
                Path(tmp) / STATE_FILE.format(rank=self.rank),
            )
            (Path(tmp) / TAG_FILE).write_text(json.dumps({"stage": self.spec.stage.name, "step": step}))
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))


def _write_placement(path: Path, device: torch.device) -> None:
    """Record where this worker runs (node, device, GPU ids, pid): placement checks and debugging."""
    path.parent.mkdir(parents=True, exist_ok=True)
    info = {
        "node_id": ray.get_runtime_context().get_node_id(),
        "device": str(device),
        "gpu_ids": [str(g) for g in ray.get_gpu_ids()],
        "pid": os.getpid(),
    }
    path.write_text(json.dumps(info))


def _audit(batches: Iterator[dict], path: Path) -> Iterator[dict]:
    """Append each batch's row ids to ``path`` as it is handed to the loop (the exactly-once audit)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    for batch in batches:
        with path.open("a") as fh:
            fh.write(json.dumps([str(i) for i in batch["ids"]]) + "\n")
        yield batch
