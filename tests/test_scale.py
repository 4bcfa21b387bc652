"""The cost model (vlsi_ray.scale) against what the code runs: FLOPs, peak bytes, checkpoint shapes, the paper's plan."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from vlsi_ray import scale
from vlsi_ray.data.collate import ChatCollator
from vlsi_ray.data.synthetic import corpus_texts, generate_rows
from vlsi_ray.models.backbone import load_backbone
from vlsi_ray.models.qwen2_vl import build_image_processor
from vlsi_ray.models.tokenizer import train_tokenizer
from vlsi_ray.profiling import check_cost_model

ROOT = Path(__file__).resolve().parents[1]
PAPER_CONFIG = ROOT / "conf" / "qwen2vl_72b_to_7b.yaml"
MEMORY_TOLERANCE = 0.1  # the bound on predicted / measured peak bytes


@pytest.fixture(scope="module")
def tiny(one_thread):
    torch.manual_seed(0)
    rows = generate_rows("train", 8, seed=0)
    tokenizer = train_tokenizer(corpus_texts(rows), "qwen2_vl")
    batch = ChatCollator(tokenizer, build_image_processor(), "qwen2_vl")(rows[:1])
    return tokenizer, batch


def test_predicted_flops_equal_flop_counter_and_peak_bytes_are_within_ten_percent(tiny):
    tokenizer, batch = tiny
    rows = {row["what"]: row for row in check_cost_model(tokenizer, batch)}
    flops = {what: row for what, row in rows.items() if what.startswith("FLOPs")}
    peaks = {what: row for what, row in rows.items() if what.startswith("peak bytes")}
    assert len(flops) == 6 and len(peaks) == 4
    # the image row exercises the ViT, the projector, LoRA, both heads and checkpointing's recompute
    for what, row in flops.items():
        assert row["predicted"] == row["measured"], what
    for what, row in peaks.items():
        assert abs(row["predicted"] / row["measured"] - 1) <= MEMORY_TOLERANCE, (what, row)
    # checkpointing costs a recompute, and saves memory
    assert rows["FLOPs, step 2, with checkpointing"]["measured"] > rows["FLOPs, step 2, without checkpointing"]["measured"]
    assert (
        rows["peak bytes, step 2, with checkpointing"]["measured"]
        < 0.75 * rows["peak bytes, step 2, without checkpointing"]["measured"]
    )


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "llava_onevision"])
def test_shapes_of_a_hub_checkpoint_count_its_parameters(hub_worlds, family):
    """From a bfloat16 checkpoint in the Hub's layout (config.json, sharded safetensors): every parameter counted."""
    world = hub_worlds(family)
    for path in (world.teacher, world.student):
        shape = scale.ModelShape.from_checkpoint(path)
        stored = 0
        for file in sorted(Path(path).glob("*.safetensors")):
            with safe_open(str(file), "pt") as f:
                stored += sum(math.prod(f.get_slice(name).get_shape()) for name in f.keys())
        loaded = load_backbone(path)
        assert shape.params() == stored == sum(p.numel() for p in loaded.model.parameters())


def test_released_checkpoint_shapes_give_their_published_sizes():
    sizes = {
        name: scale.ModelShape.from_hf_config(config, name).params() / 1e9 for name, config in scale.KNOWN_CHECKPOINTS.items()
    }
    # the model cards: Qwen2-VL 73.4B / 8.29B / 2.21B, LLaVA-OneVision 73.2B / 8.03B
    assert sizes["Qwen2-VL-72B-Instruct"] == pytest.approx(73.4, abs=0.05)
    assert sizes["Qwen2-VL-7B-Instruct"] == pytest.approx(8.29, abs=0.01)
    assert sizes["Qwen2-VL-2B-Instruct"] == pytest.approx(2.21, abs=0.01)
    assert sizes["llava-onevision-qwen2-72b-ov-hf"] == pytest.approx(73.2, abs=0.1)
    assert sizes["llava-onevision-qwen2-7b-ov-hf"] == pytest.approx(8.03, abs=0.01)


def test_unknown_checkpoint_without_config_is_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        scale.ModelShape.from_checkpoint(tmp_path / "Some-Model")


def test_paper_plan_before_was_teacher_bound_and_did_not_fit_step_1_the_config_s_6_2_split_does():
    cfg, teacher, student = scale.load_run(PAPER_CONFIG)
    work, gpu = scale.Workload(), scale.GPUS["A100"]
    before = scale.PIPELINED_4_4
    verbalize, interact, sft = scale.stage_costs(teacher, student, cfg, before, gpu, work)
    teacher2, student2 = interact.sides
    assert interact.bottleneck == "teacher" and student2.samples_per_s > 10 * teacher2.samples_per_s
    assert not verbalize.sides[0].fits(gpu)  # 20 verb-FFNs with float32 AdamW beside a quarter of the 72B
    layout = scale.layout_of(cfg)
    assert (layout.split, layout.teacher_parallel, layout.tensor_parallel, layout.step1_replicas) == ("6:2", "tensor", 2, 3)
    assert layout.step1_optimizer == "zero2-offload" and layout.shard_verbalizers
    stages = scale.stage_costs(teacher, student, cfg, layout, gpu, work)
    assert all(side.fits(gpu) for stage in stages for side in stage.sides)
    step1 = stages[0].sides[0]  # 68.4 GiB of frozen weights, the bf16 verb-FFN halves and their gradients
    assert step1.peak_bytes / scale.GiB == pytest.approx(77.3, abs=0.1) and step1.host_bytes / scale.GiB == pytest.approx(
        10.0, abs=0.1
    )
    teacher2, student2 = stages[1].sides
    assert teacher2.samples_per_s == pytest.approx(student2.samples_per_s, rel=0.1)  # FLOP-balanced
    assert scale.days(stages, 2_900_000) < scale.days([verbalize, interact, sft], 2_900_000) / 4
    # step 3 on every GPU once the teacher is gone: a quarter of the run's days less than on the 2 student GPUs
    assert layout.sft_workers == 8 and stages[2].sides[0].gpus == 8
    on_two = scale.stage_costs(teacher, student, cfg, dataclasses.replace(layout, sft_workers=0), gpu, work)
    assert scale.days(stages, 2_900_000) < 0.8 * scale.days(on_two, 2_900_000)
