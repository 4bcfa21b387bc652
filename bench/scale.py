"""The cost model of a run (:mod:`vlsi_ray.scale`): samples/s, bottleneck, memory, GPU-hours and days.

    python bench/scale.py                               # conf/qwen2vl_72b_to_7b.yaml, A100 and H100, before vs now
    python bench/scale.py --split 4:4 --student-mfu 0.194   # and 4:4 with TP=2 replicas, at a measured student MFU
    python bench/scale.py --samples 2900000 --mfu 0.4 --tokens 2048 --response 614 --image-tokens 1024
    python bench/scale.py --config conf/qwen2vl_72b_to_7b.yaml teacher.path=/models/Qwen2-VL-72B-Instruct
    python bench/scale.py --check                       # the model against measured FLOPs and peak bytes (tiny models)

For each GPU type it costs the layout the paper config ran before its 6:2 split
(:data:`~vlsi_ray.scale.PIPELINED_4_4`: one teacher replica spread layer-wise over 4 GPUs, one busy at a
time; step 1's teacher on it with float32 AdamW) beside the config's own (``layout_of``; the paper
config: three tensor-parallel replicas of 2 GPUs, 2 student workers; step 1's teacher data-parallel over
the three, verb-FFNs split over each replica's ranks, their optimizer state on the host) and, with
``--split``, a FLOP-balanced alternative (step 3 there on all GPUs), and prints per step and side: GPUs, TFLOP per sample, samples/s, GiB per GPU
(and whether it fits), the bottleneck, GPU-hours and days for ``--samples``; then the days of the
whole run side by side and their ratio. Shapes come from the checkpoints' ``config.json`` where
the paths exist, else from the released checkpoints' shapes (:data:`vlsi_ray.scale.KNOWN_CHECKPOINTS`).

``--check`` runs every step's objective on tiny Qwen2-VL models and prints the FLOPs
:class:`~vlsi_ray.profiling.MatmulFlops` counts (``torch.utils.flop_counter``'s formulas) and the peak
tensor bytes :class:`~vlsi_ray.profiling.PeakTensorBytes` measures beside the model's prediction and
their ratio; goal: every ratio within 1 ± 0.1.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from vlsi_ray.env import set_offline_defaults  # noqa: E402

set_offline_defaults()

from vlsi_ray import scale  # noqa: E402

PAPER_CONFIG = ROOT / "conf" / "qwen2vl_72b_to_7b.yaml"
CHECK_TOLERANCE = 0.1  # |predicted / measured - 1| at most this


def gib(value: float) -> str:
    return f"{value / scale.GiB:.1f}"


def layout_table(stages: list[scale.StageCost], layout: scale.Layout, gpu: scale.Gpu, samples: int) -> None:
    """One markdown table: a row per step and side."""
    print(f"\n{gpu.name}, {layout.name} ({layout.split})\n")
    print("| step | side | GPUs | TFLOP/sample | samples/s | GiB/GPU | fits | bottleneck | signal MB/s | GPU-h | days |")
    print("|---|---|---:|---:|---:|---:|---|---|---:|---:|---:|")
    for stage in stages:
        for i, side in enumerate(stage.sides):
            first = i == 0
            cells = [
                stage.name if first else "",
                side.name,
                str(side.gpus),
                f"{side.flops / 1e12:.1f}",
                f"{side.samples_per_s:.2f}",
                gib(side.peak_bytes),
                "yes" if side.fits(gpu) else "**no**",
                f"**{stage.bottleneck}**" if first and len(stage.sides) > 1 else "",
                f"{stage.signal_bytes * stage.rate / 1e6:.0f}" if first and stage.signal_bytes else "",
                f"{scale.gpu_hours(stage, layout, samples):,.0f}" if first else "",
                f"{samples / stage.rate / 86400:.1f}" if first else "",
            ]
            print("| " + " | ".join(cells) + " |")


def memory_breakdown(stages: list[scale.StageCost], layout: scale.Layout) -> None:
    """Bytes per GPU by part, for the runbook."""
    print(f"\nGiB per GPU by part, {layout.name}:\n")
    for stage in stages:
        for side in stage.sides:
            parts = ", ".join(f"{name} {gib(value)}" for name, value in side.bytes_per_gpu.items() if value)
            host = f"; {gib(side.host_bytes)} more on the host" if side.host_bytes else ""
            print(f"- {stage.name}, {side.name}: {parts} (total {gib(side.peak_bytes)}{host})")


def cost(args: argparse.Namespace) -> int:
    cfg, teacher, student = scale.load_run(args.config, args.overrides)
    work = scale.Workload(tokens=args.tokens, response=args.response, image_tokens=args.image_tokens)
    configured = scale.layout_of(cfg)
    layouts = [scale.PIPELINED_4_4, configured]
    if args.split:
        t_gpus, s_gpus = (int(n) for n in args.split.split(":"))
        layouts.append(scale.balanced_layout(configured, t_gpus, s_gpus, args.tensor_parallel))
    print(
        f"{Path(args.config).name}: {teacher.name} ({teacher.params() / 1e9:.1f}B) -> {student.name} "
        f"({student.params() / 1e9:.1f}B); {work.tokens:,} tokens a sample ({work.image_tokens:,} from the image, "
        f"{work.response:,} response positions); {args.mfu:.0%} MFU"
        + (f" (student {args.student_mfu:.0%})" if args.student_mfu is not None else "")
        + f"; {args.samples:,} samples per step"
    )
    flops = {
        "teacher signal (step 2)": scale.teacher_signal_flops(
            teacher, work, scale.StepSettings(targets=len(cfg.teacher.targets.resolve(teacher.text.layers)))
        ),
        "student step 2": scale.interact_flops(
            student,
            work,
            scale.StepSettings(
                len(cfg.student.targets.resolve(student.text.layers)), cfg.lora.rank, cfg.student.gradient_checkpointing
            ),
        ),
    }
    print("\n| TFLOP per sample | vision | blocks | heads | total |\n|---|---:|---:|---:|---:|")
    for name, parts in flops.items():
        print(f"| {name} | " + " | ".join(f"{v / 1e12:.1f}" for v in parts.values()) + f" | {sum(parts.values()) / 1e12:.1f} |")
    summary = []
    for gpu_name in args.gpus:
        gpu = scale.GPUS[gpu_name]
        days = []
        for layout in layouts:
            stages = scale.stage_costs(teacher, student, cfg, layout, gpu, work, args.mfu, args.student_mfu)
            layout_table(stages, layout, gpu, args.samples)
            if args.memory:
                memory_breakdown(stages, layout)
            days.append(scale.days(stages, args.samples))
        summary.append((gpu.name, days))
    names = [f"days, {layout.name} ({layout.split})" for layout in layouts]
    ratios = [f"{layouts[0].name} ÷ {layout.name}" for layout in layouts[1:]]
    print("\n| GPU | " + " | ".join(names + ratios) + " |\n|---|" + "---:|" * (len(names) + len(ratios)))
    for name, days in summary:
        cells = [f"{d:.1f}" for d in days] + [f"{days[0] / d:.2f}" for d in days[1:]]
        print(f"| {name} | " + " | ".join(cells) + " |")
    return 0


def check(args: argparse.Namespace) -> int:
    import torch  # noqa: PLC0415

    from vlsi_ray.data.collate import ChatCollator  # noqa: PLC0415
    from vlsi_ray.data.synthetic import corpus_texts, generate_rows  # noqa: PLC0415
    from vlsi_ray.models.qwen2_vl import build_image_processor  # noqa: PLC0415
    from vlsi_ray.models.tokenizer import train_tokenizer  # noqa: PLC0415
    from vlsi_ray.profiling import check_cost_model  # noqa: PLC0415

    torch.manual_seed(0)
    rows = generate_rows("train", 8, seed=0)
    tokenizer = train_tokenizer(corpus_texts(rows), "qwen2_vl")
    batch = ChatCollator(tokenizer, build_image_processor(), "qwen2_vl")(rows[:1])
    results = check_cost_model(tokenizer, batch)
    print("| check (tiny Qwen2-VL, float32) | measured | predicted | predicted ÷ measured |\n|---|---:|---:|---:|")
    worst = 0.0
    for row in results:
        ratio = row["predicted"] / row["measured"]
        worst = max(worst, abs(ratio - 1))
        print(f"| {row['what']} | {row['measured']:,.0f} | {row['predicted']:,.0f} | {ratio:.3f} |")
    print(f"\nworst |ratio - 1| = {worst:.3f} (goal <= {CHECK_TOLERANCE})")
    return 0 if worst <= CHECK_TOLERANCE else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default=str(PAPER_CONFIG))
    parser.add_argument("overrides", nargs="*", help="key=value config overrides")
    parser.add_argument("--gpus", nargs="+", default=["A100", "H100"], choices=sorted(scale.GPUS))
    parser.add_argument("--samples", type=int, default=2_900_000, help="samples each step sees (the paper's mixture: 2.9M)")
    parser.add_argument("--mfu", type=float, default=0.4, help="fraction of the dense bf16 peak every GPU sustains")
    parser.add_argument(
        "--student-mfu", type=float, default=None, help="the student's side, if not --mfu (bench/gpu_calibrate.py)"
    )
    parser.add_argument("--tokens", type=int, default=scale.Workload.tokens)
    parser.add_argument("--response", type=int, default=scale.Workload.response)
    parser.add_argument("--image-tokens", type=int, default=scale.Workload.image_tokens)
    parser.add_argument(
        "--split", default="", help="teacher:student GPUs of a FLOP-balanced layout to cost beside the config's (e.g. 4:4)"
    )
    parser.add_argument("--tensor-parallel", type=int, default=2, help="GPUs per teacher replica in the --split layout")
    parser.add_argument("--memory", action="store_true", help="also print the bytes per GPU by part")
    parser.add_argument("--check", action="store_true", help="check the model against measurements on tiny models")
    args = parser.parse_args()
    return check(args) if args.check else cost(args)


if __name__ == "__main__":
    sys.exit(main())
