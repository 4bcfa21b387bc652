"""The stage table: every training stage of a run, in order, with what it trains and how it is seeded.

Both runners read it (the in-process reference and the Ray driver), as do the dry run and the
teacher cache. A stage runs when its ``step`` is in the config's ``steps`` (the tiny models'
pretraining only without a checkpoint ``path``; the SFT-only baseline only with ``baseline_sft``).

==================  ================  =======  =========  ==========  ====  ===================================
stage               step              side     objective  settings    seed  trains
==================  ================  =======  =========  ==========  ====  ===================================
pretrain_teacher    pretrain_teacher  teacher  sft        pretrain_*  +1    the tiny teacher from scratch
pretrain_student    pretrain_student  student  sft        pretrain_*  +2    the tiny student from scratch
baseline_sft        sft               student  sft        sft         +5    the LLM, without distillation
verbalize/teacher   verbalize         teacher  verbalize  verbalize   +3    the teacher's verb-FFNs
verbalize/student   verbalize         student  verbalize  verbalize   +4    the student's verb-FFNs
interact            interact          student  interact   interact    +6    LoRA + verb-FFNs vs the teacher
sft                 sft               student  sft        sft         +5    the LLM, LoRA merged (step 3)
==================  ================  =======  =========  ==========  ====  ===================================

``cfg.seed + seed`` seeds a stage's batch order, its LoRA initialisation, its matching RNG and its
tail samples; the SFT-only baseline shares step 3's seed so that the two see the same batches.
"""

from __future__ import annotations

from dataclasses import dataclass

from vlsi_ray.method.steps import SFT_GROUPS, InteractionObjective, SFTObjective, VerbalizationObjective


@dataclass(frozen=True)
class Stage:
    """One row of :data:`STAGES`.

    ``side``: whose model it trains (``teacher`` or ``student``; on Ray the teacher's stages run in
    the teacher pool, the student's in the Train run). ``objective``: ``sft``, ``verbalize`` or
    ``interact`` (:mod:`vlsi_ray.method.steps`). ``settings``: the ``stages.<settings>`` optimizer
    section. ``groups``: the parameter groups an ``sft`` stage trains (None: all). ``lora``: trains
    through LoRA adapters merged at the end (step 3 also does under ``stages.sft_lora``).
    ``writes``: what it saves into the run layout: ``model`` (:meth:`RunLayout.model`) and/or
    ``verbalizers`` (the ``side``'s, :meth:`RunLayout.verbalizers`). ``trains``: in words, for plans.
    """

    name: str
    step: str
    side: str
    objective: str
    settings: str
    seed_offset: int
    writes: tuple[str, ...]
    trains: str
    groups: tuple[str, ...] | None = None
    lora: bool = False

    def seed(self, run_seed: int) -> int:
        """The stage's seed in a run seeded ``run_seed``."""
        return run_seed + self.seed_offset


STAGES: tuple[Stage, ...] = (
    Stage(
        "pretrain_teacher",
        "pretrain_teacher",
        "teacher",
        "sft",
        "pretrain_teacher",
        1,
        ("model",),
        "the tiny teacher, from scratch (SFT)",
    ),
    Stage(
        "pretrain_student",
        "pretrain_student",
        "student",
        "sft",
        "pretrain_student",
        2,
        ("model",),
        "the tiny student, from scratch (SFT)",
    ),
    Stage(
        "baseline_sft",
        "sft",
        "student",
        "sft",
        "sft",
        5,
        ("model",),
        "the student's LLM by SFT alone (the report's baseline)",
        groups=SFT_GROUPS,
    ),
    Stage(
        "verbalize/teacher",
        "verbalize",
        "teacher",
        "verbalize",
        "verbalize",
        3,
        ("verbalizers",),
        "the teacher's verb-FFNs (backbone frozen)",
    ),
    Stage(
        "verbalize/student",
        "verbalize",
        "student",
        "verbalize",
        "verbalize",
        4,
        ("verbalizers",),
        "the student's verb-FFNs (backbone frozen)",
    ),
    Stage(
        "interact",
        "interact",
        "student",
        "interact",
        "interact",
        6,
        ("model", "verbalizers"),
        "student LoRA + verb-FFNs against the teacher's signal",
        lora=True,
    ),
    Stage("sft", "sft", "student", "sft", "sft", 5, ("model",), "the student's LLM, LoRA merged", groups=SFT_GROUPS),
)
_BY_NAME = {s.name: s for s in STAGES}


def stage(name: str) -> Stage:
    """The :data:`STAGES` row called ``name``."""
    if name not in _BY_NAME:
        raise KeyError(f"unknown stage {name!r}; the stages are {', '.join(_BY_NAME)}.")
    return _BY_NAME[name]


def pretraining(role: str) -> Stage:
    """The pretraining stage of the tiny ``role`` model (``teacher`` or ``student``)."""
    return stage(f"pretrain_{role}")


def build_objective(stage: Stage, cfg, model, *, verbalizers=None, teacher=None, generator=None, vocab: int | None = None):
    """The objective of ``stage`` for ``model`` from ``cfg``'s sections: the one place objectives are built.

    ``verbalizers``: the model's verb-FFNs (``verbalize``, ``interact``); ``teacher``: ``batch ->
    TeacherSignal`` and ``generator``: the matching RNG (``interact``); ``vocab``: the shared vocabulary.
    """
    chunk_size = cfg.loss.chunk_size
    if stage.objective == "sft":
        return SFTObjective(model, stage.groups, chunk_size)
    if stage.objective == "verbalize":
        return VerbalizationObjective(model, verbalizers, chunk_size)
    return InteractionObjective(model, verbalizers, teacher, cfg.matching, cfg.loss, generator=generator, vocab_size=vocab)


def planned(cfg) -> list[Stage]:
    """The rows ``cfg`` runs, in order: those whose ``step`` is in ``steps``, without the pretraining of a
    model given by ``path`` and without the SFT-only baseline unless ``baseline_sft``."""
    rows = []
    for row in STAGES:
        if row.step not in cfg.steps or (row.name == "baseline_sft" and not cfg.baseline_sft):
            continue
        if row.name.startswith("pretrain_") and getattr(cfg, row.side).path is not None:
            continue
        rows.append(row)
    return rows
