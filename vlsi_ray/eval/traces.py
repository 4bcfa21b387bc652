"""Layer-wise verbalization traces (the paper's Fig. 3): what every verbalizer layer of a model would say.

For one image + question, each verbalizer layer decodes its own greedy continuation: at every step
the full model runs on the prompt plus that layer's tokens so far, and the layer's verbalizer head
(``verbalizers.head(layer, final_norm, lm_head)`` on ``hidden_states[layer]``) picks the next token.
The model's own output (LM head on the last block) is traced the same way as the ``final`` row, so
its text is the model's greedy answer. All layers are decoded together as one batch (every row has
the same length at every step, so no padding is needed). Each row also records the top-k next-token
probabilities at the first answer position.

:func:`run_sources` finds the (model, verbalizers) pairs of a run directory: the teacher, the student
before distillation and the student after it; an export directory has its verbalizers in
``vlsi_verbalizers/``. :func:`write_traces` writes ``traces.json`` and a self-contained ``traces.html``.
"""

from __future__ import annotations

import base64
import html
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import OmegaConf

from vlsi_ray.data.collate import ChatCollator
from vlsi_ray.eval.benchmarks import image_mime
from vlsi_ray.models.backbone import Backbone
from vlsi_ray.models.verbalizer import Verbalizers
from vlsi_ray.recipe.layout import RunLayout

#: Where an export (jobs/export.py) keeps the student's verbalizers.
EXPORT_VERBALIZERS = "vlsi_verbalizers"


@dataclass(frozen=True)
class TraceSource:
    """A model directory and the directory of its verbalizers, under a display name."""

    name: str
    model_dir: Path
    verbalizers_dir: Path


def run_sources(run_dir: str | Path) -> list[TraceSource]:
    """The traceable models of a run directory, in order: teacher, student before, student after distillation.

    teacher = ``pretrain_teacher`` + ``verbalize/teacher_verbalizers``; student before =
    ``pretrain_student`` + ``verbalize/student_verbalizers``; student after = ``sft/student`` (or
    ``interact/student`` when step 3 did not run) + ``interact/student_verbalizers``. Pairs whose
    directories are missing are left out; a base model taken from ``teacher.path``/``student.path``
    is found through the run's ``config.yaml``.
    """
    run = Path(run_dir)
    if not run.is_dir():
        raise FileNotFoundError(f"run directory {run} does not exist; pass the <output_dir>/<name> of a run.")
    layout = RunLayout(run)
    paths = _configured_paths(layout)
    after = layout.model("sft") if _is_model(layout.model("sft")) else layout.model("interact")
    candidates = [
        TraceSource("teacher", _base(layout, "pretrain_teacher", paths.get("teacher")), layout.verbalizers("teacher")),
        TraceSource(
            "student before distillation", _base(layout, "pretrain_student", paths.get("student")), layout.verbalizers("student")
        ),
        TraceSource("student after distillation", after, layout.verbalizers("student", "interact")),
    ]
    found = [s for s in candidates if _is_model(s.model_dir) and Verbalizers.exists(s.verbalizers_dir)]
    if not found:
        raise FileNotFoundError(
            f"{run} has no model with saved verbalizers (e.g. pretrain_teacher/ with "
            "verbalize/teacher_verbalizers/); run the verbalize step first or pass --model and --verbalizers."
        )
    return found


def export_source(export_dir: str | Path) -> TraceSource:
    """The (model, verbalizers) pair of an export directory (verbalizers in ``vlsi_verbalizers/``)."""
    export = Path(export_dir)
    if not Verbalizers.exists(export / EXPORT_VERBALIZERS):
        raise FileNotFoundError(f"{export} has no {EXPORT_VERBALIZERS}/; export with verbalizers kept, or pass --verbalizers.")
    return TraceSource(f"export {export.name}", export, export / EXPORT_VERBALIZERS)


def _is_model(path: Path) -> bool:
    return (path / "config.json").is_file()


def _base(layout: RunLayout, stage: str, configured: str | None) -> Path:
    """A tiny model the run pretrained, else the checkpoint the run's config names."""
    return layout.model(stage) if _is_model(layout.model(stage)) or not configured else Path(configured)


def _configured_paths(layout: RunLayout) -> dict[str, str]:
    if not layout.config.is_file():
        return {}
    cfg = OmegaConf.load(layout.config)
    return {role: cfg[role].get("path") for role in ("teacher", "student") if role in cfg and cfg[role].get("path")}


# ------------------------------------------------------------------------------------------ trace
@torch.no_grad()
def trace_layers(backbone: Backbone, verbalizers: Verbalizers, row: dict, max_tokens: int = 8, top_k: int = 5) -> list[dict]:
    """Greedy text of every verbalizer layer and of the final layer for one chat row.

    ``row``: the project's chat row (``messages`` with one user turn, ``image``); a trailing
    assistant turn is ignored. Returns one dict per verbalizer layer, then the final layer:
    ``{"layer": block number, "kind": "verbalizer" | "final", "text", "token_ids", "top": [{"token",
    "id", "prob"}] * top_k}``; ``top`` is the softmax of that layer's logits ``[V]`` at the first answer
    position. Decoding stops at the end-of-turn token or after ``max_tokens`` tokens.
    """
    _check_pair(backbone, verbalizers)
    b = backbone
    layers = list(verbalizers.layers)
    heads = [verbalizers.head(layer, b.final_norm, b.lm_head) for layer in layers]
    n = len(layers) + 1  # one batch row per verbalizer layer, the last row for the model's own output
    collator = ChatCollator(b.tokenizer, b.image_processor, b.family, prompt_only=True)
    batch = collator([row] * n)
    verbalizers.to(b.device, b.dtype).eval()
    b.model.eval()
    tokens: list[list[int]] = [[] for _ in range(n)]
    finished = [False] * n
    top: list[list[dict]] = []
    for step in range(max_tokens):
        out = b.forward(batch)
        last = [heads[i](out.hidden_states[layer][i, -1:])[0] for i, layer in enumerate(layers)]
        logits = torch.stack(last + [out.logits[n - 1, -1]]).float()  # [n, V]
        if step == 0:
            probs, ids = logits.softmax(dim=-1).topk(top_k, dim=-1)
            top = [
                [{"token": b.tokenizer.decode([int(t)]), "id": int(t), "prob": float(p)} for p, t in zip(pr, ti)]
                for pr, ti in zip(probs, ids)
            ]
        chosen = logits.argmax(dim=-1)  # [n]
        for i, token in enumerate(chosen.tolist()):
            if not finished[i]:
                finished[i] = token == b.eos_token_id
                if not finished[i]:
                    tokens[i].append(token)
        if all(finished) or step == max_tokens - 1:
            break
        batch = _extended(batch, chosen)
    return [
        {"layer": layer, "kind": kind, "text": b.tokenizer.decode(ids, skip_special_tokens=True), "token_ids": ids, "top": t}
        for layer, kind, ids, t in zip(layers + [b.num_layers], ["verbalizer"] * len(layers) + ["final"], tokens, top)
    ]


def _extended(batch: dict, chosen: torch.Tensor) -> dict:
    """``batch`` with one more token per row (``chosen [n]``); image-token flags of new tokens are 0."""
    out = dict(batch)
    column = chosen.to(batch["input_ids"].device)[:, None]
    out["input_ids"] = torch.cat([batch["input_ids"], column], dim=1)
    out["attention_mask"] = torch.cat([batch["attention_mask"], torch.ones_like(column)], dim=1)
    if "mm_token_type_ids" in batch:
        out["mm_token_type_ids"] = torch.cat(
            [batch["mm_token_type_ids"], torch.zeros_like(column).to(batch["mm_token_type_ids"])], dim=1
        )
    return out


def _check_pair(backbone: Backbone, verbalizers: Verbalizers) -> None:
    if verbalizers.hidden_size != backbone.hidden_size:
        raise ValueError(
            f"the verbalizers are {verbalizers.hidden_size} wide but {backbone.name} has hidden size "
            f"{backbone.hidden_size}; pass the verbalizers saved with this model."
        )
    bad = [layer for layer in verbalizers.layers if not 1 <= layer <= backbone.num_layers]
    if bad:
        raise ValueError(
            f"verbalizer layers {bad} do not exist in {backbone.name} ({backbone.num_layers} blocks); "
            "pass the verbalizers saved with this model."
        )


def trace_source(source: TraceSource, row: dict, max_tokens: int = 8, top_k: int = 5, device: str = "cpu") -> dict:
    """Load ``source`` and trace ``row``: ``{"name", "model_dir", "verbalizers_dir", "num_layers", "layers": [...]}``."""
    backbone = Backbone.from_pretrained(source.model_dir, device=device)
    verbalizers = Verbalizers.load(source.verbalizers_dir, device=device).to(backbone.compute_dtype)  # a bfloat16 model's heads
    return {
        "name": source.name,
        "model_dir": str(source.model_dir),
        "verbalizers_dir": str(source.verbalizers_dir),
        "num_layers": backbone.num_layers,
        "layers": trace_layers(backbone, verbalizers, row, max_tokens, top_k),
    }


# ------------------------------------------------------------------------------------------ output
def question_of(row: dict) -> str:
    """The user turn's text of a chat row."""
    messages = json.loads(row["messages"]) if isinstance(row["messages"], str) else row["messages"]
    user = next(m for m in messages if m["role"] == "user")
    content = user["content"]
    return content if isinstance(content, str) else "".join(p.get("text", "") for p in content if p.get("type") == "text")


def write_traces(out_dir: str | Path, row: dict, traces: Sequence[dict]) -> tuple[Path, Path]:
    """Write ``traces.json`` and ``traces.html`` (the images as data URIs, question, one table row per layer);
    return both paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    images = [bytes(image) for image in row.get("images") or []]
    record = {"row_id": row.get("id"), "question": question_of(row), "answer": row.get("answer"), "models": list(traces)}
    (out / "traces.json").write_text(json.dumps(record, indent=2))
    (out / "traces.html").write_text(_html(record, images))
    return out / "traces.json", out / "traces.html"


_CSS = (
    "body{font-family:sans-serif;margin:2em} table{border-collapse:collapse;margin-bottom:2em} "
    "td,th{border:1px solid #ccc;padding:4px 8px;text-align:left;vertical-align:top} "
    "td.text{font-family:monospace;white-space:pre-wrap} .top{font-family:monospace;font-size:90%}"
)


def _printable(text: str) -> str:
    return html.escape("".join(c if c.isprintable() or c == "\n" else f"\\x{ord(c):02x}" for c in text))


def _html(record: dict, images: Sequence[bytes]) -> str:
    pictures = "".join(
        f"<img src='data:{image_mime(image)};base64,{base64.b64encode(image).decode()}' width='224' style='image-rendering:pixelated'> "
        for image in images
    )
    parts = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>VLsI verbalization traces</title><style>{_CSS}</style></head><body>",
        "<h1>What each layer would say</h1>",
        f"<p>{pictures}</p>",
        f"<p><b>Question</b><br><span class='text'>{_printable(record['question']).replace(chr(10), '<br>')}</span></p>",
    ]
    if record.get("answer"):
        parts.append(f"<p><b>Reference answer</b>: {_printable(record['answer'])}</p>")
    for model in record["models"]:
        parts += [
            f"<h2>{_printable(model['name'])}</h2>",
            f"<p class='top'>{_printable(model['model_dir'])} + {_printable(model['verbalizers_dir'])}</p>",
            "<table><tr><th>layer</th><th>greedy text</th><th>top-5 next tokens at the first answer position</th></tr>",
        ]
        for layer in model["layers"]:
            label = f"{layer['layer']} (final)" if layer["kind"] == "final" else str(layer["layer"])
            top = ", ".join(f"{_printable(repr(t['token']))} {t['prob']:.2f}" for t in layer["top"])
            parts.append(f"<tr><td>{label}</td><td class='text'>{_printable(layer['text'])}</td><td class='top'>{top}</td></tr>")
        parts.append("</table>")
    parts.append("</body></html>")
    return "\n".join(parts)
