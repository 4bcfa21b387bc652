"""Released checkpoints, in process: the Hub's layout per family, bfloat16 end to end, every assistant turn labelled.

Each family's pair is written the way its releases are stored (bfloat16 shards with an index, 4.x weight
names and config keys, the released chat template and processor files, no project marker) and loads
only through ``teacher.path`` / ``student.path``.
"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

from vlsi_ray.config import load_config
from vlsi_ray.data.collate import IGNORE_INDEX, ChatCollator
from vlsi_ray.data.shards import read_rows
from vlsi_ray.eval.traces import run_sources, trace_source
from vlsi_ray.export import export_student
from vlsi_ray.metrics import read_metrics
from vlsi_ray.models.backbone import Backbone
from vlsi_ray.models.families import FAMILIES, get_family
from vlsi_ray.models.verbalizer import Verbalizers
from vlsi_ray.prepare import check_pair_paths
from vlsi_ray.runners.local import run_local

from hub_world import HUB_STEPS

#: The architecture each release names, and weight-name prefixes its shards use (transformers 4.x classes).
RELEASED = {
    "qwen2_vl": ("Qwen2VLForConditionalGeneration", ("model.layers.0.", "visual.blocks.0.", "visual.merger.", "lm_head.")),
    "qwen2_5_vl": ("Qwen2_5_VLForConditionalGeneration", ("model.layers.0.", "visual.blocks.0.", "visual.merger.", "lm_head.")),
    "llava_onevision": (
        "LlavaOnevisionForConditionalGeneration",
        (
            "language_model.model.layers.0.",
            "language_model.lm_head.",
            "vision_tower.vision_model.",
            "multi_modal_projector.",
            "image_newline",
        ),
    ),
}
STAGES = ("verbalize/teacher", "verbalize/student", "interact", "baseline_sft", "sft")


@pytest.fixture(scope="module", params=list(FAMILIES))
def world(request, hub_worlds):
    return hub_worlds(request.param)


def test_the_directory_is_laid_out_as_released(world):
    spec = get_family(world.family)
    architecture, prefixes = RELEASED[world.family]
    for directory in (world.teacher, world.student):
        files = {p.name for p in directory.iterdir()}
        assert {
            "config.json",
            "generation_config.json",
            "tokenizer.json",
            "tokenizer_config.json",
            "vocab.json",
            "merges.txt",
            "chat_template.json",
            "preprocessor_config.json",
            "model.safetensors.index.json",
        } <= files
        assert "vlsi_backbone.json" not in files and "model.safetensors" not in files
        index = json.loads((directory / "model.safetensors.index.json").read_text())
        shards = sorted(set(index["weight_map"].values()))
        assert len(shards) >= 2 and shards == sorted(f for f in files if f.endswith(".safetensors"))
        assert all(any(name.startswith(p) for name in index["weight_map"]) for p in prefixes)
        assert not any(name.startswith("model.language_model.") for name in index["weight_map"])  # 4.x names only
        config = json.loads((directory / "config.json").read_text())
        assert config["architectures"] == [architecture] and config["torch_dtype"] == "bfloat16" and "dtype" not in config
        tokenizer_config = json.loads((directory / "tokenizer_config.json").read_text())
        assert tokenizer_config["tokenizer_class"] == "Qwen2Tokenizer" and tokenizer_config["eos_token"] == "<|im_end|>"
        assert [t["content"] for t in tokenizer_config["added_tokens_decoder"].values()] == list(spec.special_tokens)
        assert json.loads((directory / "chat_template.json").read_text())["chat_template"] == spec.chat_template
        preprocessor = json.loads((directory / "preprocessor_config.json").read_text())
        if spec.has_min_pixels:
            assert {"min_pixels", "max_pixels"} <= set(preprocessor) and "size" not in preprocessor
        else:
            assert json.loads((directory / "processor_config.json").read_text())["num_image_tokens"] > 0


def test_loads_in_its_saved_dtype_and_forwards(world):
    backbone = Backbone.from_pretrained(world.student)
    assert backbone.family == world.family
    assert backbone.compute_dtype == backbone.checkpoint_dtype == torch.bfloat16
    assert {p.dtype for p in backbone.model.parameters()} == {torch.bfloat16}
    assert backbone.tokenizer.chat_template == get_family(world.family).chat_template
    rows, _ = read_rows(world.data, split="train")
    batch = ChatCollator(backbone.tokenizer, backbone.image_processor, world.family)(rows[:2])
    with torch.no_grad():
        out = backbone.forward(batch)
    assert out.logits.dtype == torch.bfloat16 and torch.isfinite(out.logits.float()).all()
    assert len(out.hidden_states) == backbone.num_layers + 1


def test_every_assistant_turn_is_labelled_and_nothing_else(world):
    """A system turn, three user/assistant turns (an image in the first): labels are exactly each answer and
    its end of turn; the generation prompt of the last turn is the training sequence up to its answer."""
    backbone = Backbone.from_pretrained(world.student)
    tok = backbone.tokenizer
    rows, _ = read_rows(world.data, split="train")
    answers = ["B", "a red circle on the left.", "C"]
    messages = [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Which option?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": answers[0]}]},
        {"role": "user", "content": "Describe the image."},
        {"role": "assistant", "content": answers[1]},
        {"role": "user", "content": [{"type": "text", "text": "And now?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": answers[2]}]},
    ]
    row = {"id": "three-turns", "images": rows[0]["images"], "messages": json.dumps(messages)}
    collator = ChatCollator(tok, backbone.image_processor, world.family)
    batch = collator([row])
    labels, ids = batch["labels"][0], batch["input_ids"][0]
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    expected = [t for a in answers for t in tok.encode(a, add_special_tokens=False) + [eos]]
    assert labels[labels != IGNORE_INDEX].tolist() == expected
    assert torch.equal(ids[labels != IGNORE_INDEX], labels[labels != IGNORE_INDEX])
    assert "Answer briefly." in tok.decode(ids[labels == IGNORE_INDEX])  # the system turn is in the prompt, unlabelled
    spans = (labels != IGNORE_INDEX).int().diff().eq(1).sum().item() + int(labels[0] != IGNORE_INDEX)
    assert spans == 3
    prompt = collator([row], prompt_only=True)["input_ids"][0]
    last_answer = (labels != IGNORE_INDEX).nonzero().flatten()[-len(tok.encode(answers[2], add_special_tokens=False)) - 1]
    assert prompt.tolist() == ids[:last_answer].tolist()


@pytest.mark.integration
def test_bfloat16_run_in_process_trains_every_stage_and_exports(world, tmp_path, one_thread):
    """Steps 1-3 and the SFT-only baseline on the released-layout pair: finite losses, every stage's
    student saved in the base checkpoint's dtype (verb-FFNs float32), evaluations, layer-wise traces of
    the run's models, and an export that plain transformers loads in bfloat16 (or float32 when asked)."""
    from transformers import AutoModelForImageTextToText  # noqa: PLC0415 (transformers loads on use (after the offline defaults are set))

    cfg = load_config(None, world.overrides(f"bf16-{world.family}"))
    report = run_local(cfg)
    records = list(read_metrics(cfg.run_dir / "metrics.jsonl"))
    for stage in STAGES:
        losses = [r["loss"] for r in records if r["stage"] == stage]
        settings = "sft" if stage == "baseline_sft" else stage.split("/")[0]
        assert len(losses) == HUB_STEPS[settings] and all(math.isfinite(x) for x in losses), stage
    for rel in ("interact/student", "baseline_sft/student", "sft/student"):
        config = json.loads((cfg.run_dir / rel / "config.json").read_text())
        assert config["dtype"] == "bfloat16", rel
    for rel in ("verbalize/teacher_verbalizers", "verbalize/student_verbalizers", "interact/student_verbalizers"):
        assert {p.dtype for p in Verbalizers.load(cfg.run_dir / rel).parameters()} == {torch.float32}, rel
    assert set(report["accuracy"]) == {"teacher", "student_base", "student_sft_only", "vlsi_without_sft", "vlsi"}
    assert all(0.0 <= result["overall"] <= 1.0 for result in report["accuracy"].values())
    row = read_rows(world.data, split="test")[0][0]
    for source in run_sources(cfg.run_dir):  # bfloat16 models, float32-saved verbalizers
        trace = trace_source(source, row, max_tokens=2)
        assert len(trace["layers"]) == len(Verbalizers.load(source.verbalizers_dir).layers) + 1, source.name

    exported = export_student(cfg.run_dir, tmp_path / "export")
    model = AutoModelForImageTextToText.from_pretrained(exported)
    assert model.dtype == torch.bfloat16 and json.loads((exported / "config.json").read_text())["dtype"] == "bfloat16"
    wide = export_student(cfg.run_dir, tmp_path / "export32", dtype="float32")
    assert AutoModelForImageTextToText.from_pretrained(wide).dtype == torch.float32
    assert torch.equal(AutoModelForImageTextToText.from_pretrained(wide).lm_head.weight, model.lm_head.weight.float())


@pytest.mark.integration
def test_step2_in_bfloat16_tracks_float32(hub_worlds, one_thread):
    """The same step 2 (same weights, data, seeds, exact signal) computed in bfloat16 and in float32:
    per-step losses within 1% (measured: 0.09% at most; bfloat16 keeps 8 bits of mantissa, the losses are float32)."""
    world = hub_worlds("qwen2_vl")
    losses = {}
    for dtype in ("bfloat16", "float32"):
        cfg = load_config(
            None,
            world.overrides(
                f"step2-{dtype}",
                "steps=[interact]",
                "baseline_sft=false",
                "eval_models=[]",
                "stages.interact.max_steps=6",
                "signal.topk=100000",
                "signal.storage=float32",
                f"teacher.dtype={dtype}",
                f"student.dtype={dtype}",
            ),
        )
        run_local(cfg)
        losses[dtype] = [r["loss"] for r in read_metrics(cfg.run_dir / "metrics.jsonl", "interact")]
    print("step-2 losses bf16", losses["bfloat16"], "fp32", losses["float32"])
    assert len(losses["bfloat16"]) == len(losses["float32"]) == 6
    for low, ref in zip(losses["bfloat16"], losses["float32"]):
        assert abs(low - ref) <= 0.01 * abs(ref)


def test_hub_checkpoints_job_writes_a_loadable_pair(tmp_path):
    """``jobs/hub_checkpoints.py``: a tiny released-layout pair a user can point teacher.path/student.path at."""
    spec = importlib.util.spec_from_file_location("hub_job", Path(__file__).resolve().parents[1] / "jobs" / "hub_checkpoints.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main(["--out", str(tmp_path), "--family", "qwen2_5_vl"]) == 0
    teacher, student = tmp_path / "qwen2_5_vl" / "teacher", tmp_path / "qwen2_5_vl" / "student"
    assert check_pair_paths(teacher, student) > 0
    loaded = Backbone.from_pretrained(teacher)
    assert (loaded.family, loaded.num_layers, loaded.compute_dtype) == ("qwen2_5_vl", 8, torch.bfloat16)
