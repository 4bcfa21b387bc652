"""Export a finished run's distilled student as a plain transformers checkpoint (LoRA merged, no verbalizers in it).

    python jobs/export.py --run-dir runs/tiny --out exports/tiny

The directory loads with ``AutoModelForImageTextToText.from_pretrained(out)`` (plus ``AutoTokenizer``
and ``AutoImageProcessor``) without vlsi_ray, and is what ``jobs/serve.py`` and ``conf/serve.yaml``
serve. The student's verbalizers are kept in ``out/vlsi_verbalizers/`` for layer-wise traces unless
``--no-verbalizers`` is given.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from vlsi_ray.env import set_offline_defaults  # noqa: E402

set_offline_defaults()

from vlsi_ray.export import STUDENT_STAGES, ExportError, export_student  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", default="runs/tiny", help="the run to export (default: runs/tiny)")
    parser.add_argument("--out", default=None, help="output directory (default: exports/<run name>)")
    parser.add_argument(
        "--stage", default="auto", choices=("auto", *STUDENT_STAGES), help="which student: auto = sft if finished, else interact"
    )
    parser.add_argument(
        "--dtype",
        default=None,
        choices=("float32", "bfloat16", "float16"),
        help="dtype of the exported weights (default: the base checkpoint's, as the run saved the student)",
    )
    parser.add_argument("--no-verbalizers", action="store_true", help="do not copy the verbalizers next to the model")
    args = parser.parse_args(argv)
    out = Path(args.out or Path("exports") / Path(args.run_dir).name)
    try:
        export_student(args.run_dir, out, args.stage, args.dtype, verbalizers=not args.no_verbalizers)
    except ExportError as err:
        print(f"export error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
