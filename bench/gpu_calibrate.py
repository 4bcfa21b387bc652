"""GPU calibration of the cost model: the MFU of a 72B-shaped teacher and a 7B-shaped student step 2.

    python bench/gpu_calibrate.py                       # one GPU, about 5 minutes (most of it building the models)
    python bench/gpu_calibrate.py --pipeline            # + bench/pipeline.py's b/a against the ideal on this machine
    python bench/gpu_calibrate.py --tiny                # the same code path on the CPU with tiny shapes (a dry run)

Teacher: a stack of ``--teacher-blocks`` (4) decoder blocks of Qwen2-VL-72B's shape (d 8,192, MLP
29,568, 64 heads, 8 key/value heads) with its 152,064-row LM head, in bfloat16, one verbalizer
per 4 blocks (the paper's 20 of 80), running :func:`~vlsi_ray.signals.produce.teacher_signal`
(forward, heads at the response positions, top-64 + tail) on one row of ``--tokens`` (2,048)
tokens of which ``--response`` (614) carry the loss. Student: Qwen2-VL-7B's language model (28 blocks
of d 3,584) in bfloat16 with LoRA 64, its 7 verbalizers and gradient checkpointing, running step 2
(:class:`~vlsi_ray.method.steps.InteractionObjective`, forward + backward) against a synthetic
top-64 signal of 21 layers. Weights are random (built on the GPU in seconds; the time does not depend
on their values); the rows are text-only (the ViT is a small part of either side: ``bench/scale.py``).

The student's step also runs once more under a peak-memory meter (the CUDA allocator's
``max_memory_allocated`` above what its weights and signal hold), printed beside the bytes the cost
model predicts for it (gradients and activations at 2,048 tokens, bfloat16, checkpointing on).
Each part is timed ``--repeats`` times after ``--warmup`` runs (CUDA synchronised); the table gives
the median, the FLOPs :mod:`vlsi_ray.scale` counts for it (attention as the full square; a causal
kernel does half of that part), the FLOP/s and the MFU against the GPU's dense bf16 peak (A100 312,
H100/H200 989 TFLOP/s; ``--peak-tflops`` for another), beside the time the cost model predicts at
``bench/scale.py``'s assumed 40% MFU. Then the paper config's days on 8 of these GPUs at the
measured MFUs (teacher side at the teacher's, student side at the student's).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from vlsi_ray.env import set_offline_defaults  # noqa: E402

set_offline_defaults()

import torch  # noqa: E402
from memory import PeakCUDA, response_batch, synthetic_signal  # noqa: E402

from vlsi_ray import scale  # noqa: E402
from vlsi_ray.data.synthetic import corpus_texts, generate_rows  # noqa: E402
from vlsi_ray.method.matching import MatchingOptions  # noqa: E402
from vlsi_ray.method.steps import InteractionObjective  # noqa: E402
from vlsi_ray.models.backbone import Backbone  # noqa: E402
from vlsi_ray.models.qwen2_vl import FAMILY, build_image_processor, resolve_sizes, tiny_config  # noqa: E402
from vlsi_ray.models.tokenizer import train_tokenizer  # noqa: E402
from vlsi_ray.models.verbalizer import Verbalizers  # noqa: E402
from vlsi_ray.profiling import PeakTensorBytes  # noqa: E402
from vlsi_ray.signals.produce import teacher_signal  # noqa: E402

#: Dense bf16 peak FLOP/s by a substring of torch.cuda.get_device_name().
PEAKS = {"A100": 312e12, "H100": 989e12, "H200": 989e12, "GH200": 989e12}
ASSUMED_MFU = 0.4  # bench/scale.py's default
VOCAB = 152_064
TEACHER = dict(hidden_size=8192, num_heads=64, num_kv_heads=8, intermediate_size=29568)
STUDENT = dict(hidden_size=3584, num_layers=28, num_heads=28, num_kv_heads=4, intermediate_size=18944)
TINY_TEACHER = dict(hidden_size=128, num_heads=4, num_kv_heads=2, intermediate_size=256)
TINY_STUDENT = dict(hidden_size=64, num_layers=8, num_heads=4, num_kv_heads=2, intermediate_size=128)


def build(role: str, tokenizer, device: torch.device, dtype: torch.dtype, **sizes) -> Backbone:
    """A randomly initialised Qwen2-VL of ``sizes`` built directly on ``device`` in ``dtype`` (a small ViT)."""
    from transformers import Qwen2VLForConditionalGeneration  # noqa: PLC0415 - after the offline defaults

    full = resolve_sizes(role, tokenizer, {**sizes, "vision_depth": 1, "vision_embed_dim": 32})
    config = tiny_config(tokenizer, **{k: v for k, v in full.items() if k not in ("seed", "init_gain")})
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = Qwen2VLForConditionalGeneration(config)
    finally:
        torch.set_default_dtype(default)
    return Backbone(FAMILY, model.eval(), tokenizer, build_image_processor(), name=f"calibration {role}")


def timed(run, device: torch.device, warmup: int, repeats: int) -> list[float]:
    """Seconds of each of ``repeats`` runs of ``run()`` after ``warmup`` (CUDA synchronised)."""
    for _ in range(warmup):
        run()
    seconds = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        started = time.perf_counter()
        run()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds.append(time.perf_counter() - started)
    return seconds


def peak_bytes(run, device: torch.device) -> float:
    """Peak bytes above those allocated before, during one ``run()``: ``bench/memory.py``'s
    :class:`PeakCUDA` on a GPU, :class:`~vlsi_ray.profiling.PeakTensorBytes` on the CPU."""
    with PeakCUDA(device) if device.type == "cuda" else PeakTensorBytes() as meter:
        run()
    return meter.peak


def on(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device) for k, v in batch.items()}


def measure_teacher(tokenizer, args, device: torch.device, dtype: torch.dtype) -> dict:
    sizes = {**(TINY_TEACHER if args.tiny else TEACHER), "num_layers": args.teacher_blocks, "vocab_size": args.vocab}
    teacher = build("teacher", tokenizer, device, dtype, **sizes)
    targets = list(range(2, args.teacher_blocks, 4)) or [1]  # 2, 6, ...: the paper's one in four
    verbalizers = Verbalizers(sizes["hidden_size"], targets, zero_init=False).to(device, dtype)
    batch = on(response_batch(args.response, args.tokens - args.response, 400, torch.Generator().manual_seed(0)), device)

    def run():
        with torch.no_grad():
            teacher_signal(teacher, verbalizers, batch, topk=64)

    seconds = timed(run, device, args.warmup, args.repeats)
    shape = scale.ModelShape.from_hf_config(teacher.model.config.to_dict(), "teacher")
    work = scale.Workload(tokens=args.tokens, response=args.response, image_tokens=0)
    flops = sum(scale.teacher_signal_flops(shape, work, scale.StepSettings(targets=len(targets))).values())
    return {
        "part": f"teacher signal, {args.teacher_blocks} blocks of d {sizes['hidden_size']}",
        "seconds": statistics.median(seconds),
        "spread": (min(seconds), max(seconds)),
        "flops": flops,
    }


def measure_student(tokenizer, args, device: torch.device, dtype: torch.dtype) -> dict:
    sizes = {**(TINY_STUDENT if args.tiny else STUDENT), "vocab_size": args.vocab}
    student = build("student", tokenizer, device, dtype, **sizes)
    student.set_gradient_checkpointing(True)
    student.model.train()
    student.apply_lora(args.lora_rank, args.lora_rank)
    targets = list(range(2, sizes["num_layers"], 4))  # 2, 6, ..., 26: the paper's 7
    verbalizers = Verbalizers(sizes["hidden_size"], targets).to(device)
    generator = torch.Generator().manual_seed(0)
    signal = synthetic_signal(21, args.response, args.vocab, 64, generator).to(device)  # 20 teacher targets + final
    batch = on(response_batch(args.response, args.tokens - args.response, 400, generator), device)
    objective = InteractionObjective(
        student, verbalizers, lambda b: signal, MatchingOptions(), generator=torch.Generator().manual_seed(0)
    )

    def run():
        objective(batch).loss.backward()
        for p in objective.parameters():
            p.grad = None

    seconds = timed(run, device, args.warmup, args.repeats)
    measured = peak_bytes(run, device)
    shape = scale.ModelShape.from_hf_config(student.model.config.to_dict(), "student")
    work = scale.Workload(tokens=args.tokens, response=args.response, image_tokens=0)
    settings = scale.StepSettings(targets=len(targets), lora_rank=args.lora_rank, checkpointing=True)
    flops = sum(scale.interact_flops(shape, work, settings).values())
    acts_bytes = 2 if dtype == torch.bfloat16 else 4
    acts = scale.activation_bytes(
        shape, work, checkpointing=True, rank=args.lora_rank, heads=len(targets) + 1, compute_bytes=acts_bytes
    )
    parts = scale.training_peak_bytes(sum(p.numel() for p in objective.parameters()), acts, compute_bytes=acts_bytes)
    predicted = sum(parts.values()) - parts["trained weights"] - parts["optimizer"]  # masters exist before; no optimizer step
    print(
        f"  student step 2 peak above its weights: measured {measured / 2**30:.2f} GiB, cost model {predicted / 2**30:.2f} GiB "
        f"(predicted ÷ measured {predicted / measured:.2f})",
        flush=True,
    )
    return {
        "part": f"student step 2, {sizes['num_layers']} blocks of d {sizes['hidden_size']}",
        "seconds": statistics.median(seconds),
        "spread": (min(seconds), max(seconds)),
        "flops": flops,
    }


def peak_flops(args, device: torch.device) -> tuple[str, float]:
    if args.peak_tflops:
        return f"{device}", args.peak_tflops * 1e12
    if device.type != "cuda":
        return "CPU (no peak: MFU against 1 TFLOP/s)", 1e12
    name = torch.cuda.get_device_name(device)
    for key, peak in PEAKS.items():
        if key in name:
            return name, peak
    raise SystemExit(f"no known bf16 peak for {name}; pass --peak-tflops.")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="tiny shapes on the CPU: check the script runs")
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--response", type=int, default=614)
    parser.add_argument("--vocab", type=int, default=VOCAB)
    parser.add_argument("--teacher-blocks", type=int, default=4)
    parser.add_argument("--lora-rank", type=int, default=64)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--peak-tflops", type=float, default=0.0, help="the GPU's dense bf16 peak, if not A100/H100/H200")
    parser.add_argument("--pipeline", action="store_true", help="also run bench/pipeline.py here (b/a vs ideal)")
    parser.add_argument("--bfloat16", action="store_true", help="--tiny: compute in bfloat16 on the CPU too")
    args = parser.parse_args()
    if args.tiny:
        args.tokens, args.response, args.vocab, args.lora_rank = min(args.tokens, 256), min(args.response, 64), 4096, 8
    device = torch.device("cpu" if args.tiny or not torch.cuda.is_available() else "cuda")
    dtype = torch.bfloat16 if device.type == "cuda" or args.bfloat16 else torch.float32
    gpu, peak = peak_flops(args, device)
    tokenizer = train_tokenizer(corpus_texts(generate_rows("train", 8, seed=0)), FAMILY)
    print(f"{gpu}; {args.tokens:,} tokens a row, {args.response:,} response; {dtype}", flush=True)
    rows = []
    for measure in (measure_teacher, measure_student):
        rows.append(measure(tokenizer, args, device, dtype))
        low, high = rows[-1]["spread"]
        print(f"  {rows[-1]['part']}: {rows[-1]['seconds']:.3f} s (min {low:.3f}, max {high:.3f})", flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print(
        f"\n| part | s (median of {args.repeats}) | TFLOP (model) | TFLOP/s | MFU | model at {ASSUMED_MFU:.0%} MFU: s | measured ÷ model |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        rate = row["flops"] / row["seconds"]
        row["mfu"] = rate / peak
        predicted = row["flops"] / (peak * ASSUMED_MFU)
        print(
            f"| {row['part']} | {row['seconds']:.3f} | {row['flops'] / 1e12:.2f} | {rate / 1e12:.1f} | {row['mfu']:.1%} "
            f"| {predicted:.3f} | {row['seconds'] / predicted:.2f} |"
        )
    if device.type == "cuda" and not args.tiny:
        paper_days(rows[0]["mfu"], rows[1]["mfu"], gpu, peak)
    if args.pipeline:
        subprocess.run([sys.executable, str(ROOT / "bench" / "pipeline.py"), "--rounds", "3"], check=False)
    return 0


def paper_days(teacher_mfu: float, student_mfu: float, gpu_name: str, peak: float) -> None:
    """The paper config's days on 8 of this GPU, each side at its measured MFU: today, and the splits
    with tensor-parallel teacher replicas of 2 (bench/scale.py --mfu T --student-mfu S prints the tables)."""
    cfg, teacher, student = scale.load_run(ROOT / "conf" / "qwen2vl_72b_to_7b.yaml")
    gpu = scale.Gpu(gpu_name, peak, int(torch.cuda.get_device_properties(0).total_memory), scale.GPUS["H100"].link)
    today = scale.layout_of(cfg)
    print(f"\nthe paper config on 8 × {gpu_name}, teacher at {teacher_mfu:.1%} MFU, student at {student_mfu:.1%}:")
    for layout in (today, *(scale.balanced_layout(today, t, 8 - t, tensor_parallel=2) for t in (4, 6))):
        stages = scale.stage_costs(teacher, student, cfg, layout, gpu, scale.Workload(), teacher_mfu, student_mfu)
        bottlenecks = ", ".join(f"{stage.name}: {stage.bottleneck}" for stage in stages)
        print(
            f"  {layout.name} ({layout.split}): {scale.days(stages, 2_900_000):.1f} days for 2.9M samples per step ({bottlenecks})"
        )


if __name__ == "__main__":
    sys.exit(main())
