"""Greedy generation by stock transformers on an exported Qwen2-VL checkpoint, in a fresh interpreter that
never imports vlsi_ray: the reference the export tests compare the project's generation with."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

#: Reads ``[{"messages": [...], "images": [png paths]}]`` from argv[2]; prompts built with the tokenizer's chat
#: template, each image's placeholder expanded by hand (t·h·w / merge² tokens), one greedy ``generate`` per row,
#: exactly n new tokens (``min_new_tokens``: the end of turn is not chosen before).
SCRIPT = r"""
import json, sys
import torch
from PIL import Image
from transformers import AutoImageProcessor, AutoModelForImageTextToText, AutoTokenizer

path, rows, n = sys.argv[1], json.load(open(sys.argv[2])), int(sys.argv[3])
model = AutoModelForImageTextToText.from_pretrained(path).eval()
tokenizer = AutoTokenizer.from_pretrained(path)
processor = AutoImageProcessor.from_pretrained(path)
pad = "<|image_pad|>"
pad_id = tokenizer.convert_tokens_to_ids(pad)
answers = []
for row in rows:
    text = tokenizer.apply_chat_template(row["messages"], tokenize=False, add_generation_prompt=True)
    vision = {}
    if row["images"]:
        vision = processor(images=[Image.open(f).convert("RGB") for f in row["images"]], return_tensors="pt")
        parts = text.split(pad)
        counts = [int(thw.prod()) // processor.merge_size ** 2 for thw in vision["image_grid_thw"]]
        text = parts[0] + "".join(pad * c + rest for c, rest in zip(counts, parts[1:]))
    ids = tokenizer(text, return_tensors="pt")
    out = model.generate(**ids, **vision, mm_token_type_ids=(ids["input_ids"] == pad_id).int(), do_sample=False,
                         max_new_tokens=n, min_new_tokens=n)
    new = out[0, ids["input_ids"].shape[1]:].tolist()
    answers.append(new)
print(json.dumps({"vlsi_loaded": any(m.startswith("vlsi_ray") for m in sys.modules), "model": type(model).__name__,
                  "dtype": str(model.dtype), "token_ids": answers}))
"""


def plain_generate(model_dir: Path, rows: list[dict], max_tokens: int, work: Path) -> dict:
    """Stock transformers' greedy answers of exactly ``max_tokens`` tokens to ``rows`` (the project's shard rows;
    a trailing assistant turn is dropped) from the checkpoint in ``model_dir``: ``{"token_ids": per row, "model",
    "dtype", "vlsi_loaded"}``. The project's side: ``SamplingParams(max_tokens=n, min_tokens=n)``."""
    work.mkdir(parents=True, exist_ok=True)
    requests = []
    for r, row in enumerate(rows):
        messages = json.loads(row["messages"])
        if messages[-1]["role"] == "assistant":
            messages = messages[:-1]
        images = []
        for k, png in enumerate(row["images"]):
            images.append(str(work / f"{r}-{k}.png"))
            Path(images[-1]).write_bytes(png)
        requests.append({"messages": messages, "images": images})
    (work / "rows.json").write_text(json.dumps(requests))
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(model_dir), str(work / "rows.json"), str(max_tokens)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])
