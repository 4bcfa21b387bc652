"""Layer-wise verbalization traces (what each layer would say, Fig. 3) and a run's plots (Fig. 5, losses).

CPU-tiny (after `python jobs/distill.py`; seconds): plots into runs/tiny/plots/ and the traces of the
teacher and the student before/after distillation on test row 0 into runs/tiny/traces/:

    python jobs/verbalize.py --run-dir runs/tiny
    python jobs/verbalize.py --run-dir runs/tiny --index 7 --max-tokens 12

One model and its verbalizers (an export keeps them in vlsi_verbalizers/), on your own image:

    python jobs/verbalize.py --model exports/tiny --image board.png --question "What colour is the star?" --out /tmp/trace
    python jobs/verbalize.py --model runs/tiny/pretrain_teacher --verbalizers runs/tiny/verbalize/teacher_verbalizers \\
        --data data/synthetic --index 3 --out /tmp/trace

Writes ``traces.html`` (image, question, one row per layer: greedy text and top-5 next tokens) and
``traces.json``; with ``--run-dir`` also ``plots/losses.png``, ``layer_losses.png``, ``matching.png``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from omegaconf import OmegaConf  # noqa: E402

from vlsi_ray.env import set_offline_defaults  # noqa: E402

set_offline_defaults()

from vlsi_ray.data.shards import read_rows  # noqa: E402
from vlsi_ray.data.synthetic import messages_json  # noqa: E402
from vlsi_ray.eval.report import write_plots  # noqa: E402
from vlsi_ray.eval.traces import TraceSource, export_source, run_sources, trace_source, write_traces  # noqa: E402
from vlsi_ray.recipe.layout import RunLayout  # noqa: E402


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run-dir", help="a run directory: plots, plus traces of its teacher and students")
    p.add_argument("--model", help="one model directory to trace (instead of a run's models)")
    p.add_argument("--verbalizers", help="its verbalizers directory (default: <model>/vlsi_verbalizers of an export)")
    p.add_argument("--image", help="image file to trace on (with --question)")
    p.add_argument("--question", help="question text (with --image)")
    p.add_argument("--data", help="synthetic data directory to take the row from (default: the run's data.dir)")
    p.add_argument("--index", type=int, default=0, help="row of the data's test split (default 0)")
    p.add_argument("--max-tokens", type=int, default=8, help="greedy tokens per layer (default 8)")
    p.add_argument("--out", help="output directory (default: <run-dir>/traces)")
    p.add_argument("--no-plots", action="store_true", help="skip the run's plots")
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    if not args.run_dir and not args.model:
        p.error("pass --run-dir R or --model DIR.")
    if bool(args.image) != bool(args.question):
        p.error("--image and --question go together.")
    if not args.out and not args.run_dir:
        p.error("pass --out DIR (where to write traces.html).")
    return args


def trace_row(args) -> dict:
    """The chat row to trace: the given image + question, or a row of the synthetic test split."""
    if args.image:
        image = Path(args.image)
        if not image.is_file():
            raise FileNotFoundError(f"--image {image} does not exist; pass an image file.")
        messages = json.loads(messages_json(args.question, "-"))[:1]  # the user turn only
        return {"id": image.name, "images": [image.read_bytes()], "messages": json.dumps(messages)}
    data = args.data
    if data is None and args.run_dir:
        data = OmegaConf.load(RunLayout(args.run_dir).config).data.dir
    if data is None:
        raise FileNotFoundError("no row to trace: pass --image and --question, or --data DIR.")
    rows, _ = read_rows(data, split="test")
    if not 0 <= args.index < len(rows):
        raise IndexError(f"--index {args.index} is outside the {len(rows)} test rows of {data}; pass 0..{len(rows) - 1}.")
    return rows[args.index]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    try:
        if args.run_dir and not args.no_plots:
            for name, path in write_plots(args.run_dir).items():
                print(f"[plots] {name}: {path}")
        if args.model:
            sources = [
                TraceSource(Path(args.model).name, Path(args.model), Path(args.verbalizers))
                if args.verbalizers
                else export_source(args.model)
            ]
        else:
            sources = run_sources(args.run_dir)
        row = trace_row(args)
        traces = []
        for source in sources:
            traces.append(trace_source(source, row, args.max_tokens, device=args.device))
            for layer in traces[-1]["layers"]:
                print(
                    f"[trace] {source.name} layer {layer['layer']}{' (final)' if layer['kind'] == 'final' else ''}: {layer['text']!r}"
                )
        json_path, html_path = write_traces(args.out or RunLayout(args.run_dir).traces, row, traces)
    except (FileNotFoundError, IndexError, ValueError) as err:
        print(f"verbalize error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {html_path} and {json_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
