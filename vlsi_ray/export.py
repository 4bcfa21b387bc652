"""Export a run's distilled student as a stock transformers checkpoint.

The runners already merge LoRA before saving a stage's student, so the export re-saves the final
student through transformers (optionally in another dtype) without vlsi-ray's marker file: the
directory loads with the family's model class or ``AutoModelForImageTextToText``, ``AutoTokenizer``
and ``AutoImageProcessor`` and nothing from this project. The student's verbalizers are copied to a
side directory (``vlsi_verbalizers/``) for layer-wise traces; stock loaders ignore it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from vlsi_ray.models.backbone import BACKBONE_FILE, Backbone
from vlsi_ray.models.precision import dtype_name, parse_dtype
from vlsi_ray.models.verbalizer import Verbalizers
from vlsi_ray.recipe.layout import RunLayout

#: Stages whose ``student/`` is a finished student, most distilled first.
STUDENT_STAGES = ("sft", "interact")
VERBALIZERS_DIR = "vlsi_verbalizers"
EXPORT_FILE = "vlsi_export.json"


class ExportError(ValueError):
    """The run has nothing exportable at the requested stage."""


def find_student(run_dir: str | Path, stage: str = "auto") -> tuple[str, Path]:
    """``(stage, directory)`` of the run's final student: step 3's, else step 2's (``stage="auto"``)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ExportError(f"run directory {run_dir} does not exist; pass the output_dir/name of a finished run.")
    stages = STUDENT_STAGES if stage == "auto" else (stage,)
    for name in stages:
        if name not in STUDENT_STAGES:
            raise ExportError(f"stage {name!r} has no distilled student; use one of auto, {', '.join(STUDENT_STAGES)}.")
        layout = RunLayout(run_dir)
        model_dir = layout.model(name)
        if layout.finished(name) and (model_dir / "config.json").is_file():
            return name, model_dir
    raise ExportError(
        f"{run_dir} has no finished {' or '.join(stages)} stage with a student; finish the run first (python jobs/distill.py name=...)."
    )


def export_student(
    run_dir: str | Path, out: str | Path, stage: str = "auto", dtype: str | None = None, verbalizers: bool = True
) -> Path:
    """Write the run's final student to ``out`` as a plain transformers checkpoint; return ``out``.

    ``dtype``: ``float32``, ``bfloat16`` or ``float16`` to cast the weights (default: the dtype the
    student was saved in, which is the base checkpoint's: a bfloat16 release exports in bfloat16).
    ``verbalizers``: also copy the student's verb-FFNs (step 2's) to ``out/vlsi_verbalizers/``.
    """
    run_dir, out = Path(run_dir), Path(out)
    stage, model_dir = find_student(run_dir, stage)
    backbone = Backbone.from_pretrained(model_dir, device="cpu")
    dtype = parse_dtype(dtype) or backbone.checkpoint_dtype
    if out.exists():
        shutil.rmtree(out)
    backbone.save_pretrained(out, dtype=dtype)
    (out / BACKBONE_FILE).unlink()
    generation = backbone.model.generation_config
    generation.eos_token_id, generation.pad_token_id = backbone.eos_token_id, backbone.pad_token_id
    generation.save_pretrained(out)
    manifest = {
        "run_dir": str(run_dir.resolve()),
        "stage": stage,
        "family": backbone.family,
        "dtype": dtype_name(dtype),
        "verbalizers": None,
    }
    source = RunLayout(run_dir).verbalizers("student", "interact")
    if verbalizers and Verbalizers.exists(source):
        shutil.copytree(source, out / VERBALIZERS_DIR)
        manifest["verbalizers"] = VERBALIZERS_DIR
    (out / EXPORT_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
    print(f"[export] {stage} student of {run_dir} -> {out} ({_size_mb(out):.1f} MB)", flush=True)
    return out


def _size_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20
