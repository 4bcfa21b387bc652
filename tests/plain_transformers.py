"""Greedy generation by stock transformers on an exported Qwen2-VL checkpoint, in a fresh interpreter that
never imports vlsi_ray: the reference the export tests compare the project's generation with."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

#: Reads ``[{"messages": [...], "images": [png paths]}]`` from argv[2]; prompts built with the tokenizer's chat
#: template, each image's placeholder expanded by hand (t·h·w / merge² tokens), one greedy ``generate`` per row,
#: exactly n new tokens (``min_new_tokens``: the end of turn is not chosen before), with each step's top-5 raw
#: logits (the weights and inputs compared more finely than the tokens a tiny model collapses onto).
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
answers, tops = [], []
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
                         max_new_tokens=n, min_new_tokens=n, output_logits=True, return_dict_in_generate=True)
    answers.append(out.sequences[0, ids["input_ids"].shape[1]:].tolist())
    top = torch.stack(out.logits)[:, 0].float().topk(5)
    tops.append({"ids": top.indices.tolist(), "logits": top.values.tolist()})
print(json.dumps({"vlsi_loaded": any(m.startswith("vlsi_ray") for m in sys.modules), "model": type(model).__name__,
                  "dtype": str(model.dtype), "token_ids": answers, "top": tops}))
"""


def plain_generate(model_dir: Path, rows: list[dict], max_tokens: int, work: Path) -> dict:
    """Stock transformers' greedy answers of exactly ``max_tokens`` tokens to ``rows`` (the project's shard rows;
    a trailing assistant turn is dropped) from the checkpoint in ``model_dir``: ``{"token_ids": per row, "top": per
    row {"ids", "logits"} of each step's 5 highest raw logits, "model", "dtype", "vlsi_loaded"}``. The project's
    side: ``SamplingParams(max_tokens=n, min_tokens=n)`` and :func:`project_top_logits`."""
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


def project_top_logits(generator, rows: list[dict], max_tokens: int) -> list[dict]:
    """The project's side of :func:`plain_generate`'s ``top``: each row's prompt as the project's collator
    builds it, greedy decoding of exactly ``max_tokens`` tokens by the project's loaded model, each step's
    5 highest raw logits."""
    import torch  # noqa: PLC0415 - this module's top stays light: the script above runs in its own interpreter

    b, tops = generator.backbone, []
    for row in rows:
        inputs = b.model_inputs(generator.collator([row]))
        out = b.model.generate(
            **inputs,
            do_sample=False,
            max_new_tokens=max_tokens,
            min_new_tokens=max_tokens,
            eos_token_id=b.eos_token_id,
            pad_token_id=b.pad_token_id,
            output_logits=True,
            return_dict_in_generate=True,
        )
        top = torch.stack(out.logits)[:, 0].float().topk(5)
        tops.append({"ids": top.indices.tolist(), "logits": top.values.tolist()})
    return tops


def assert_same_top_logits(plain: list[dict], ours: list[dict], rel: float) -> None:
    """Per row and step, the same 5 highest tokens and their logits to ``rel`` (of the largest logit's size)."""
    assert len(plain) == len(ours)
    for r, (a, b) in enumerate(zip(plain, ours)):
        assert a["ids"] == b["ids"], f"row {r}: top-5 token ids differ"
        for step, (x, y) in enumerate(zip(a["logits"], b["logits"])):
            scale = max(1.0, max(abs(v) for v in y))
            assert max(abs(u - v) for u, v in zip(x, y)) <= rel * scale, f"row {r} step {step}: {x} vs {y}"
