"""The in-process reference runner: tiny-model pretraining, the three VLsI steps, the SFT-only baseline, a report.

Recipe protocol (setup → stages → evaluate → report). Each stage writes its artefacts and a
``stage.json`` into ``<run_dir>/<stage>/``; re-running the same command skips finished stages and
loads what they wrote. The Ray runner drives the same objectives from :mod:`vlsi_ray.method.steps`.
"""

from __future__ import annotations

import shutil
import threading
import time
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Callable

import torch

from vlsi_ray.config import RunConfig, to_yaml
from vlsi_ray.data.synthetic import SCORED_TASKS
from vlsi_ray.eval.accuracy import evaluate
from vlsi_ray.eval.report import write_report
from vlsi_ray.method.loop import train_stage
from vlsi_ray.method.steps import (
    SFT_GROUPS,
    InteractionObjective,
    SFTObjective,
    VerbalizationObjective,
    teacher_signal,
)
from vlsi_ray.metrics import MetricsWriter, write_stage_summary
from vlsi_ray.models.backbone import Backbone
from vlsi_ray.models.verbalizer import Verbalizers
from vlsi_ray.prepare import (
    LoadSettings,
    build_model,
    check_pair,
    frozen_verbalizers,
    load_model,
    make_collator,
    model_key,
    new_verbalizers,
    prepare_data,
    resolve_device,
    tiny_tokenizer,
)
from vlsi_ray.teacher_cache import open_cache, require_cache

STAGE_FILE = "stage.json"
_INIT_LOCK = threading.Lock()
#: Seed offsets per stage (cfg.seed + offset seeds its batch order, LoRA init and matching RNG).
PRETRAIN_SEED_OFFSET = {"teacher": 1, "student": 2}
SEED_OFFSET = {"verbalize/teacher": 3, "verbalize/student": 4, "sft": 5, "baseline_sft": 5, "interact": 6}


class Run(ABC):
    """State shared by both runners: config, data, metrics writer, the run directory and stage bookkeeping.

    Subclasses say how a tiny model is pretrained (:meth:`pretrain`): in this process or in a Ray task.
    """

    def __init__(self, cfg: RunConfig):
        self.cfg = cfg
        self.dir = cfg.run_dir
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "config.yaml").write_text(to_yaml(cfg))
        self.writer = MetricsWriter(self.dir / "metrics.jsonl")
        self.splits = prepare_data(cfg)
        needs_tokenizer = cfg.teacher.path is None or cfg.student.path is None
        self.tokenizer = tiny_tokenizer(cfg, self.splits.train) if needs_tokenizer else None

    # -- stage bookkeeping -------------------------------------------------------------------
    def stage_dir(self, name: str) -> Path:
        return self.dir / name

    def finished(self, name: str) -> bool:
        return (self.stage_dir(name) / STAGE_FILE).is_file()

    def finish(self, name: str, history: list[dict], started: float) -> None:
        write_stage_summary(self.stage_dir(name) / STAGE_FILE, name, history, time.perf_counter() - started)

    def train_rows(self, stage: str) -> list[dict]:
        tasks = getattr(self.cfg.stages, stage).tasks
        return [r for r in self.splits.train if not tasks or r["task"] in tasks]

    def test_rows(self) -> list[dict]:
        return [r for r in self.splits.test if r["task"] in SCORED_TASKS]

    # -- models ------------------------------------------------------------------------------
    def pretrained(self, role: str, stage: str) -> Path:
        """The directory of the teacher or student base: :meth:`reuse`'s, else a tiny model pretrained now."""
        found = self.reuse(role, stage)
        return found if found is not None else self.pretrain(role, stage)

    def reuse(self, role: str, stage: str) -> Path | None:
        """The teacher's or student base's directory when nothing needs training, else None.

        A local checkpoint (``path``), a tiny model pretrained before (in this run or the model
        cache), or, when ``stage`` is not in ``steps``, a tiny model saved at random init (the run says so).
        """
        model_cfg = getattr(self.cfg, role)
        if model_cfg.path is not None:
            print(f"[{role}] using the checkpoint in {model_cfg.path}", flush=True)
            return Path(model_cfg.path)
        target, cache = self.stage_dir(stage), self.model_cache(role, stage)
        for source in (target, cache):
            if source is not None and (source / STAGE_FILE).is_file():
                print(f"[{role}] reusing the tiny {role} in {source}", flush=True)
                if source != target:  # a copy (a few MB), so the run directory holds every model it used
                    shutil.copytree(source, target, dirs_exist_ok=True)
                return target
        if stage in self.cfg.steps:
            return None
        print(f"[{role}] {stage} is not in steps: the tiny {role} stays at random init", flush=True)
        self.init_model(role).save_pretrained(target)
        write_stage_summary(target / STAGE_FILE, stage, [], 0.0)
        if cache is not None:
            shutil.copytree(target, cache, dirs_exist_ok=True)
        return target

    def model_cache(self, role: str, stage: str) -> Path | None:
        """Where a tiny ``role`` model with these settings is kept across runs (``teacher_cache_dir``), or None."""
        if not self.cfg.teacher_cache_dir:
            return None
        model_cfg, opt = getattr(self.cfg, role), getattr(self.cfg.stages, stage)
        key = model_key(model_cfg, opt if stage in self.cfg.steps else None, self.cfg.data.synthetic, self.cfg.seed)
        return Path(self.cfg.teacher_cache_dir) / f"{role}-{key}"

    def init_model(self, role: str) -> Backbone:
        """A tiny ``role`` model at its seeded random init, on the CPU."""
        with _INIT_LOCK:  # initialisation seeds torch's global RNG: one model at a time (Ray runs two threads)
            return build_model(self.cfg, role, self.tokenizer, torch.device("cpu"))

    @abstractmethod
    def pretrain(self, role: str, stage: str) -> Path:
        """Pretrain a tiny ``role`` model from scratch by SFT (:func:`pretrain_tiny`); return its directory."""


class LocalRun(Run):
    """The in-process runner's state: everything on one device in this process."""

    def __init__(self, cfg: RunConfig):
        super().__init__(cfg)
        self.device = resolve_device(cfg.device)
        self.collate: Callable | None = None

    def train(self, stage: str, objective, modules, seed_offset: int, label: str | None = None) -> list[dict]:
        """Run ``objective`` with the optimisation settings of ``stage`` (the SFT baseline uses ``sft``'s)."""
        settings = "sft" if stage == "baseline_sft" else stage
        opt = getattr(self.cfg.stages, settings)
        return train_stage(
            label or stage, objective, objective.parameters(), self.train_rows(settings), self.collate, opt,
            self.cfg.seed + seed_offset, self.device, self.writer, modules, dtype=objective.compute_dtype,
        )

    def pretrain(self, role: str, stage: str) -> Path:
        return pretrain_tiny(self.cfg, role, stage, self.init_model(role), self.train_rows(stage), self.device, self.writer,
                             self.stage_dir(stage), self.model_cache(role, stage))

    def load(self, path: Path, role: str = "student") -> Backbone:
        """The checkpoint at ``path`` with ``role``'s settings (dtype, attention, checkpointing, resolution)."""
        return load_model(path, LoadSettings.of(self.cfg, role), self.device)


def pretrain_tiny(cfg: RunConfig, role: str, stage: str, backbone: Backbone, rows: list[dict], device: torch.device,
                  writer: MetricsWriter | None, target: Path, cache: Path | None = None) -> Path:
    """Pretrain a tiny ``role`` model from scratch by SFT on ``rows`` in this process; return ``target``.

    The in-process runner's pretraining, and the Ray runner's (in a Ray task per model). Saves the
    model and its ``stage.json`` to ``target``, and a copy to ``cache`` when given.
    """
    started = time.perf_counter()
    backbone.model.to(device)
    objective = SFTObjective(backbone, chunk_size=cfg.loss.chunk_size)
    history = train_stage(stage, objective, objective.parameters(), rows, make_collator(backbone, cfg),
                          getattr(cfg.stages, stage), cfg.seed + PRETRAIN_SEED_OFFSET[role], device, writer, [backbone.model],
                          dtype=backbone.compute_dtype)
    backbone.save_pretrained(target)
    write_stage_summary(Path(target) / STAGE_FILE, stage, history, time.perf_counter() - started)
    if cache is not None:
        shutil.copytree(target, cache, dirs_exist_ok=True)
    return Path(target)


def run_local(cfg: RunConfig) -> dict:
    """Run every stage in ``cfg.steps`` in this process and return the report dict."""
    started = time.perf_counter()
    require_cache(cfg)
    torch.manual_seed(cfg.seed)
    run = LocalRun(cfg)
    teacher_dir = run.pretrained("teacher", "pretrain_teacher")
    teacher = run.load(teacher_dir, "teacher")
    student_base_dir = run.pretrained("student", "pretrain_student")
    student = run.load(student_base_dir)
    vocab = check_pair(teacher, student)
    run.collate = make_collator(student, cfg)
    results: dict[str, dict] = {}
    test = run.test_rows()

    def score(name: str, backbone: Backbone) -> None:
        if name not in cfg.eval_models:
            return
        results[name] = evaluate(backbone, test, run.collate, cfg.eval_batch_size, run.device)
        print(f"[eval] {name}: {100 * results[name]['overall']:.1f}% on {results[name]['n']} test questions", flush=True)

    score("teacher", teacher)
    score("student_base", student)

    if cfg.baseline_sft and "sft" in cfg.steps:
        baseline = _stage_model(run, "baseline_sft", student_base_dir, lambda b: SFTObjective(b, SFT_GROUPS, cfg.loss.chunk_size), seed_offset=SEED_OFFSET["baseline_sft"])
        score("student_sft_only", baseline)
        del baseline

    # Step 1: verbalization (both models' verb-FFNs; backbones frozen).
    t_verbs, s_verbs = (
        new_verbalizers(cfg, "teacher", teacher, cfg.seed + SEED_OFFSET["verbalize/teacher"]),
        new_verbalizers(cfg, "student", student, cfg.seed + SEED_OFFSET["verbalize/student"]),
    )
    step1 = run.stage_dir("verbalize")
    if run.finished("verbalize"):
        t_verbs = Verbalizers.load(step1 / "teacher_verbalizers", run.device)
        s_verbs = Verbalizers.load(step1 / "student_verbalizers", run.device)
    elif "verbalize" in cfg.steps:
        t0 = time.perf_counter()
        history = []
        for role, backbone, verbs in (("teacher", teacher, t_verbs), ("student", student, s_verbs)):
            objective = VerbalizationObjective(backbone, verbs, cfg.loss.chunk_size)
            history += run.train("verbalize", objective, [verbs], seed_offset=SEED_OFFSET[f"verbalize/{role}"], label=f"verbalize/{role}")
            verbs.save(step1 / f"{role}_verbalizers")
        run.finish("verbalize", history, t0)

    # Step 2: interaction (student LoRA + verb-FFNs; teacher frozen).
    step2 = run.stage_dir("interact")
    if run.finished("interact"):
        student = run.load(step2 / "student")
        s_verbs = Verbalizers.load(step2 / "student_verbalizers", run.device)
    elif "interact" in cfg.steps:
        t0 = time.perf_counter()
        teacher.model.eval()
        t_verbs = frozen_verbalizers(t_verbs, teacher)
        torch.manual_seed(cfg.seed + SEED_OFFSET["interact"])  # LoRA's random A matrices, as the Ray workers draw them
        student.apply_lora(cfg.lora.rank, cfg.lora.alpha, cfg.lora.dropout)
        generator = torch.Generator().manual_seed(cfg.seed + SEED_OFFSET["interact"])
        if cfg.teacher.source == "cache":
            signal = open_cache(cfg, teacher_dir, student_base_dir, step1 / "teacher_verbalizers", vocab)
        else:
            def signal(batch: dict):
                return teacher_signal(teacher, t_verbs, batch, cfg.signal.topk, cfg.loss.kd_temperature, vocab,
                                      tail_samples=cfg.signal.tail_samples, seed=cfg.seed + SEED_OFFSET["interact"])
        objective = InteractionObjective(
            student, s_verbs, signal, cfg.matching, generator, cfg.loss.direction, cfg.loss.kd_temperature,
            cfg.loss.last_layer, cfg.loss.chunk_size, vocab, intermediate=cfg.loss.intermediate,
        )
        history = run.train("interact", objective, [student.model, s_verbs], seed_offset=SEED_OFFSET["interact"])
        student.merge_lora()
        student.save_pretrained(step2 / "student")
        student.round_to_compute_dtype()  # the float32 masters, now saved, back to the dtype the evaluation runs in
        s_verbs.save(step2 / "student_verbalizers")
        run.finish("interact", history, t0)
    if "interact" in cfg.steps:
        score("vlsi_without_sft", student)

    # Step 3: SFT of the distilled student (LoRA merged, the LLM fine-tuned fully).
    if "sft" in cfg.steps:
        source = step2 / "student" if (step2 / STAGE_FILE).is_file() else student_base_dir
        student = _stage_model(run, "sft", source, lambda b: SFTObjective(b, SFT_GROUPS, cfg.loss.chunk_size), seed_offset=SEED_OFFSET["sft"])
        score("vlsi", student)

    report = {"run": cfg.name, "seconds": round(time.perf_counter() - started, 1), "accuracy": results,
              "skipped_rows": {k: v.skipped for k, v in run.splits.stats.items()}}
    write_report(run.dir, report)
    print(f"[done] report in {run.dir / 'report.md'} ({report['seconds']:.0f}s)", flush=True)
    return report


def _stage_model(run: LocalRun, stage: str, source, make_objective, seed_offset: int) -> Backbone:
    """Load a finished stage's student, or train it by SFT from the checkpoint at ``source``."""
    target = run.stage_dir(stage)
    if run.finished(stage):
        return run.load(target / "student")
    t0 = time.perf_counter()
    backbone = run.load(source)
    lora = run.cfg.stages.sft_lora
    if lora:
        backbone.apply_lora(run.cfg.lora.rank, run.cfg.lora.alpha, run.cfg.lora.dropout)
    history = run.train(stage, make_objective(backbone), [backbone.model], seed_offset=seed_offset)
    if lora:
        backbone.merge_lora()
    backbone.save_pretrained(target / "student")
    backbone.round_to_compute_dtype()
    run.finish(stage, history, t0)
    return backbone
