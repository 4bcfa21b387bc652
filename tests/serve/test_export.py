"""Export: a stock transformers checkpoint whose greedy output equals the project's model."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from vlsi_ray.data.shards import read_rows
from vlsi_ray.export import ExportError, export_student
from vlsi_ray.generation import ChatGenerator, SamplingParams

#: Runs in a fresh interpreter that never imports vlsi_ray: prompt built with the tokenizer's chat
#: template, image placeholders expanded by hand (t·h·w / merge² per image), greedy generate.
PLAIN_TRANSFORMERS = r"""
import io, json, sys
import torch
from PIL import Image
from transformers import AutoImageProcessor, AutoModelForImageTextToText, AutoTokenizer

path, question, image_file, n = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
model = AutoModelForImageTextToText.from_pretrained(path).eval()
tokenizer = AutoTokenizer.from_pretrained(path)
processor = AutoImageProcessor.from_pretrained(path)
messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
vision = processor(images=[Image.open(image_file).convert("RGB")], return_tensors="pt")
count = int(vision["image_grid_thw"][0].prod()) // processor.merge_size ** 2
text = text.replace("<|image_pad|>", "<|image_pad|>" * count)
ids = tokenizer(text, return_tensors="pt")
image_id = tokenizer.convert_tokens_to_ids("<|image_pad|>")
out = model.generate(**ids, **vision, mm_token_type_ids=(ids["input_ids"] == image_id).int(),
                     do_sample=False, max_new_tokens=n)
new = out[0, ids["input_ids"].shape[1]:].tolist()
print(json.dumps({"vlsi_loaded": any(m.startswith("vlsi_ray") for m in sys.modules), "model": type(model).__name__,
                  "text": tokenizer.decode(new, skip_special_tokens=True)}))
"""


def test_export_layout(exported, tiny_run):
    manifest = json.loads((exported / "vlsi_export.json").read_text())
    assert manifest["stage"] == "sft" and manifest["family"] == "qwen2_vl"
    assert (exported / "vlsi_verbalizers" / "verbalizers.safetensors").is_file()
    assert not (exported / "vlsi_backbone.json").exists()
    assert (
        json.loads((exported / "generation_config.json").read_text())["eos_token_id"]
        == json.loads((tiny_run.run / "sft" / "student" / "generation_config.json").read_text())["eos_token_id"]
    )


def test_plain_transformers_greedy_matches(exported, tiny_run, tmp_path):
    row = read_rows(tiny_run.data, split="test")[0][0]
    messages = json.loads(row["messages"])
    question = next(p["text"] for p in messages[0]["content"] if p["type"] == "text")
    (tmp_path / "image.png").write_bytes(row["images"][0])
    n = 12
    ours = ChatGenerator.from_pretrained(tiny_run.run / "sft" / "student").generate([row], SamplingParams(max_tokens=n))[0]
    proc = subprocess.run(
        [sys.executable, "-c", PLAIN_TRANSFORMERS, str(exported), question, str(tmp_path / "image.png"), str(n)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    plain = json.loads(proc.stdout.strip().splitlines()[-1])
    assert plain["vlsi_loaded"] is False and plain["model"] == "Qwen2VLForConditionalGeneration"
    assert ours.completion_tokens > 0
    assert plain["text"] == ours.text


def test_export_refuses_an_unfinished_run(tmp_path):
    (tmp_path / "run" / "interact").mkdir(parents=True)
    with pytest.raises(ExportError, match="no finished sft or interact stage"):
        export_student(tmp_path / "run", tmp_path / "out")
    with pytest.raises(ExportError, match="has no distilled student"):
        export_student(tmp_path / "run", tmp_path / "out", stage="verbalize")
