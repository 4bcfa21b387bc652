"""The in-process reference runner: tiny-model pretraining, the three VLsI steps, the SFT-only baseline, a report.

Recipe protocol (setup → stages → evaluate → report), one phase per step of the stage table
(:data:`vlsi_ray.recipe.stages.STAGES`). Each stage writes its artefacts and its marker into the run
directory (:class:`vlsi_ray.recipe.layout.RunLayout`); re-running the same command skips finished
stages and loads what they wrote. The Ray runner follows the same table with the same objectives.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path

import pyarrow as pa
import torch

from vlsi_ray.config import RunConfig
from vlsi_ray.data.index import measure_in_process
from vlsi_ray.eval.heldout import heldout_report, score_rows, summary_line
from vlsi_ray.eval.report import write_report
from vlsi_ray.method.loop import train_stage
from vlsi_ray.models.backbone import Backbone
from vlsi_ray.models.verbalizer import Verbalizers
from vlsi_ray.prepare import (
    LoadSettings,
    check_pair,
    frozen_verbalizers,
    load_model,
    make_collator,
    new_verbalizers,
    read_split_rows,
    require_data,
    resolve_device,
)
from vlsi_ray.recipe.stages import Stage, build_objective, pretraining, stage
from vlsi_ray.runners.base import Run, pretrain_tiny
from vlsi_ray.teacher.cache import require_cache
from vlsi_ray.teacher.sources import teacher_source


class LocalRun(Run):
    """The in-process runner: every stage on one device in this process, one method per phase."""

    def __init__(self, cfg: RunConfig):
        super().__init__(cfg)
        self.device = resolve_device(cfg.device)
        self.collate: Callable | None = None
        self.results: dict[str, dict] = {}
        self._rows: dict[str, dict[str, dict]] = {}  # split -> id -> row, read once

    def pretrain(self, role: str) -> Path:
        name = pretraining(role).name
        return pretrain_tiny(
            self.cfg,
            role,
            self.init_model(role),
            self.pretraining_rows(name),
            self.device,
            self.writer,
            self.layout.model(name),
            self.model_cache(role),
        )

    def measure(self, files: Sequence[str]) -> pa.Table:
        return measure_in_process(files, self.collate)

    def rows(self, split: str, ids: Sequence[str]) -> list[dict]:
        """The whole rows of ``ids`` (in their order), read from the ``split`` shards in this process once."""
        if split not in self._rows:
            self._rows[split] = {row["id"]: row for row in read_split_rows(self.cfg, split, ids=self.index[split].ids())}
        return [self._rows[split][i] for i in ids]

    def load(self, path: Path, role: str = "student") -> Backbone:
        """The checkpoint at ``path`` with ``role``'s settings (dtype, attention, checkpointing, resolution)."""
        return load_model(path, LoadSettings.of(self.cfg, role), self.device)

    def train(self, spec: Stage, objective, modules) -> list[dict]:
        """Run ``objective`` over the stage's rows with its optimizer settings and seed (:data:`STAGES`)."""
        opt = getattr(self.cfg.stages, spec.settings)
        return train_stage(
            spec.name,
            objective,
            objective.parameters(),
            self.rows("train", self.train_ids(spec.settings)),
            self.collate,
            opt,
            spec.seed(self.cfg.seed),
            self.device,
            self.writer,
            modules,
            dtype=objective.compute_dtype,
            **self.grouping(spec.settings),
        )

    def score(self, name: str, backbone: Backbone) -> None:
        """Held-out loss and test accuracy of ``backbone`` under report name ``name`` (when ``eval_models`` lists it)."""
        if name not in self.cfg.eval_models:
            return
        rows = [row for split, ids in self.eval_ids() for row in self.rows(split, ids)]
        records = score_rows(backbone, rows, self.collate, self.cfg.eval_batch_size, self.device, self.option_letters())
        self.results[name] = heldout_report(records)
        print(summary_line(name, self.results[name]), flush=True)

    # -- phases ------------------------------------------------------------------------------------
    def models(self) -> tuple[Backbone, Backbone, int]:
        """Setup: the teacher and the student base (pretrained now if tiny), the pair check, the collator."""
        self.teacher_dir, self.student_dir = self.pretrained("teacher"), self.pretrained("student")
        teacher, student = self.load(self.teacher_dir, "teacher"), self.load(self.student_dir)
        vocab = check_pair(teacher, student)
        self.collate = make_collator(student, self.cfg)
        self.index_data(self.student_dir)
        return teacher, student, vocab

    def sft(self, name: str, source: Path) -> Backbone:
        """An SFT stage of the student (step 3 or the SFT-only baseline) from the checkpoint at ``source``."""
        spec, target = stage(name), self.layout.model(name)
        if self.layout.finished(name):
            return self.load(target)
        started = time.perf_counter()
        backbone = self.load(source)
        lora = self.cfg.stages.sft_lora
        if lora:
            backbone.apply_lora(self.cfg.lora.rank, self.cfg.lora.alpha, self.cfg.lora.dropout)
        history = self.train(spec, build_objective(spec, self.cfg, backbone), [backbone.model])
        if lora:
            backbone.merge_lora()
        backbone.save_pretrained(target)
        backbone.round_to_compute_dtype()
        self.finish(name, history, started)
        return backbone

    def verbalize(self, teacher: Backbone, student: Backbone) -> tuple[Verbalizers, Verbalizers]:
        """Step 1: both models' verb-FFNs (backbones frozen); untrained ones when step 1 is not in ``steps``."""
        models = {"teacher": teacher, "student": student}
        verbs = {
            role: new_verbalizers(self.cfg, role, models[role], stage(f"verbalize/{role}").seed(self.cfg.seed)) for role in models
        }
        if self.layout.finished("verbalize"):
            return tuple(Verbalizers.load(self.layout.verbalizers(role), self.device) for role in models)
        if "verbalize" not in self.cfg.steps:
            return verbs["teacher"], verbs["student"]
        started, history = time.perf_counter(), []
        for role in models:
            spec = stage(f"verbalize/{role}")
            history += self.train(spec, build_objective(spec, self.cfg, models[role], verbalizers=verbs[role]), [verbs[role]])
            verbs[role].save(self.layout.verbalizers(role))
        self.finish("verbalize", history, started)
        return verbs["teacher"], verbs["student"]

    def interact(
        self, teacher: Backbone, t_verbs: Verbalizers, student: Backbone, s_verbs: Verbalizers, vocab: int
    ) -> tuple[Backbone, Verbalizers]:
        """Step 2: the student's LoRA and verb-FFNs against the teacher's signal (teacher frozen)."""
        spec = stage("interact")
        if self.layout.finished("interact"):
            return self.load(self.layout.model("interact")), Verbalizers.load(
                self.layout.verbalizers("student", "interact"), self.device
            )
        if "interact" not in self.cfg.steps:
            return student, s_verbs
        started, seed = time.perf_counter(), spec.seed(self.cfg.seed)
        teacher.model.eval()
        torch.manual_seed(seed)  # LoRA's random A matrices, as the Ray workers draw them
        student.apply_lora(self.cfg.lora.rank, self.cfg.lora.alpha, self.cfg.lora.dropout)
        signal = teacher_source(
            self.cfg,
            self.layout,
            vocab,
            teacher=teacher,
            verbalizers=frozen_verbalizers(t_verbs, teacher),
            teacher_dir=self.teacher_dir,
            student_dir=self.student_dir,
        )
        objective = build_objective(
            spec,
            self.cfg,
            student,
            verbalizers=s_verbs,
            teacher=signal,
            generator=torch.Generator().manual_seed(seed),
            vocab=vocab,
        )
        history = self.train(spec, objective, [student.model, s_verbs])
        student.merge_lora()
        student.save_pretrained(self.layout.model("interact"))
        student.round_to_compute_dtype()  # the float32 masters, now saved, back to the dtype the evaluation runs in
        s_verbs.save(self.layout.verbalizers("student", "interact"))
        self.finish("interact", history, started)
        return student, s_verbs

    def report(self, started: float) -> dict:
        """The run's report (accuracies, bad rows) as ``report.json``, ``report.md`` and plots."""
        report = {
            "run": self.cfg.name,
            "seconds": round(time.perf_counter() - started, 1),
            "accuracy": self.results,
            "skipped_rows": self.skipped_rows(),
        }
        write_report(self.layout.root, report)
        print(f"[done] report in {self.layout.report_md} ({report['seconds']:.0f}s)", flush=True)
        return report


def run_local(cfg: RunConfig) -> dict:
    """Run every stage in ``cfg.steps`` in this process, in the order of the stage table; return the report dict."""
    started = time.perf_counter()
    require_data(cfg)
    require_cache(cfg)
    torch.manual_seed(cfg.seed)
    run = LocalRun(cfg)
    teacher, student, vocab = run.models()
    run.score("teacher", teacher)
    run.score("student_base", student)
    if run.runs("baseline_sft"):
        run.score("student_sft_only", run.sft("baseline_sft", run.student_dir))
    t_verbs, s_verbs = run.verbalize(teacher, student)
    student, s_verbs = run.interact(teacher, t_verbs, student, s_verbs, vocab)
    if "interact" in cfg.steps:
        run.score("vlsi_without_sft", student)
    if run.runs("sft"):
        step2 = run.layout.model("interact")
        run.score("vlsi", run.sft("sft", step2 if run.layout.finished("interact") else run.student_dir))
    return run.report(started)
