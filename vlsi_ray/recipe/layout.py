"""Every path of a run directory, named in one place.

::

    <output_dir>/<name>/
      config.yaml  metrics.jsonl  report.json  report.md  plots/  traces/  wandb/
      pretrain_teacher/          the tiny teacher (a model directory) + stage.json
      pretrain_student/          the tiny student base
      baseline_sft/student/      the SFT-only baseline
      verbalize/{teacher,student}_verbalizers/   step 1; stage.student.json (student side), stage.json (both)
      interact/student/  interact/student_verbalizers/   step 2 (LoRA merged); teacher_placement.json
      sft/student/               step 3
      teacher_cache/             the offline teacher signal (default location)
      ray_train/                 Ray Train storage (checkpoints) and the tiny models' initial weights

A stage is finished once its marker (``stage.json``, written after its outputs) exists; re-running a
run skips finished stages. Stage names are those of :data:`vlsi_ray.recipe.stages.STAGES`.
"""

from __future__ import annotations

from pathlib import Path

#: The marker a stage writes once its outputs are saved (its summary: steps, seconds, last losses).
STAGE_FILE = "stage.json"


class RunLayout:
    """The paths of the run directory ``root`` (nothing is created until a runner writes there)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    # ----- run-wide files ---------------------------------------------------------------------------
    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def report_json(self) -> Path:
        return self.root / "report.json"

    @property
    def report_md(self) -> Path:
        return self.root / "report.md"

    @property
    def plots(self) -> Path:
        return self.root / "plots"

    @property
    def traces(self) -> Path:
        return self.root / "traces"

    @property
    def teacher_cache(self) -> Path:
        """Where the offline teacher signal goes unless ``teacher.cache_dir`` says otherwise."""
        return self.root / "teacher_cache"

    @property
    def ray_train(self) -> Path:
        """Ray Train's storage (the student's checkpoints) and the tiny models' initial weights."""
        return self.root / "ray_train"

    # ----- stages -----------------------------------------------------------------------------------
    def stage_dir(self, stage: str) -> Path:
        """The folder of ``stage`` (``verbalize/student`` and ``verbalize/teacher`` share ``verbalize/``)."""
        return self.root / stage.split("/")[0]

    def marker(self, stage: str) -> Path:
        """The file whose existence says ``stage`` is finished: ``<stage>/stage.json``, or
        ``verbalize/stage.<side>.json`` for one side of step 1 (``stage.json`` there means both)."""
        folder, _, side = stage.partition("/")
        return self.root / folder / (f"stage.{side}.json" if side else STAGE_FILE)

    def finished(self, stage: str) -> bool:
        return self.marker(stage).is_file()

    @staticmethod
    def marker_in(model_dir: str | Path) -> Path:
        """The marker inside a tiny model's directory (its pretraining stage's folder, or a copy of it in
        the model cache): the model is complete once it exists."""
        return Path(model_dir) / STAGE_FILE

    def model(self, stage: str) -> Path:
        """The model directory ``stage`` writes: the folder itself for the tiny models' pretraining,
        ``<stage>/student`` for the student stages."""
        return self.stage_dir(stage) if stage.startswith("pretrain_") else self.stage_dir(stage) / "student"

    def verbalizers(self, role: str, stage: str = "verbalize") -> Path:
        """``role``'s verbalizers as ``stage`` wrote them (step 1: both roles; step 2: the student's)."""
        return self.stage_dir(stage) / f"{role}_verbalizers"

    def initial_model(self, stage: str) -> Path:
        """A tiny model's initial weights, saved before its pretraining task starts."""
        return self.ray_train / f"{stage}-init"

    def consumed_ids(self, stage: str, rank: int) -> Path:
        """The data audit of one Train worker (``train.log_ids``): every row id it trained on."""
        return self.stage_dir(stage) / f"consumed_ids.{stage.replace('/', '-')}.rank{rank}.jsonl"

    def worker_placement(self, stage: str, rank: int) -> Path:
        """Where one Train worker ran (node, device, GPU ids, pid)."""
        return self.stage_dir(stage) / f"placement.{stage.replace('/', '-')}.rank{rank}.json"

    @property
    def teacher_placement(self) -> Path:
        """Where step 2's teacher replicas ran."""
        return self.root / "interact" / "teacher_placement.json"
