"""Multiple-choice accuracy on the synthetic task: exact, by the option letter the model ranks first.

The answer is read at the first response position: the model's logits there are restricted to the
option letters' tokens (A–D) and the highest wins. This is greedy decoding of the first answer
token with the output constrained to the valid options, so accuracy is exact and needs no parsing.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence

import torch

from vlsi_ray.method.steps import model_inputs, response_positions
from vlsi_ray.models.backbone import Backbone


def letter_token_ids(tokenizer, letters: str = "ABCD") -> list[int]:
    """Token id of each option letter; raises if a letter is not a single token."""
    ids = []
    for letter in letters:
        tokens = tokenizer.encode(letter, add_special_tokens=False)
        if len(tokens) != 1:
            raise ValueError(
                f"option letter {letter!r} is {len(tokens)} tokens in this tokenizer; retrain it so A–D are single tokens."
            )
        ids.append(tokens[0])
    return ids


@torch.no_grad()
def predict_letters(
    backbone: Backbone,
    rows: Sequence[dict],
    collate: Callable[[list[dict]], dict],
    letter_ids: Sequence[int],
    batch_size: int,
    device: torch.device,
    letters: str = "ABCD",
) -> list[str]:
    """Predicted option letter for each row (rows must have a single-letter assistant answer)."""
    backbone.model.eval()
    predictions: list[str] = []
    index = torch.tensor(list(letter_ids), device=device)
    for start in range(0, len(rows), batch_size):
        batch = collate(list(rows[start : start + batch_size]))
        batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        logits = backbone.forward(model_inputs(batch)).logits  # [B, T, V]
        mask, _ = response_positions(batch["labels"])
        first = mask.float().argmax(dim=1)  # first response position per row
        scores = logits[torch.arange(logits.shape[0], device=device), first][:, index]  # [B, 4]
        predictions.extend(letters[i] for i in scores.argmax(dim=-1).tolist())
    return predictions


def accuracy_report(rows: Sequence[dict], predictions: Sequence[str]) -> dict:
    """``{"overall": acc, "per_task": {task: acc}, "n": count}`` with accuracies in [0, 1]."""
    hits: dict[str, list[bool]] = defaultdict(list)
    for row, pred in zip(rows, predictions):
        hits[row["task"]].append(pred == row["answer"])
    every = [h for values in hits.values() for h in values]
    return {
        "overall": sum(every) / max(1, len(every)),
        "per_task": {task: sum(v) / len(v) for task, v in sorted(hits.items())},
        "n": len(every),
    }


def evaluate(
    backbone: Backbone,
    rows: Sequence[dict],
    collate: Callable[[list[dict]], dict],
    batch_size: int,
    device: torch.device,
) -> dict:
    """Accuracy of ``backbone`` on the multiple-choice ``rows`` (see :func:`accuracy_report`)."""
    letter_ids = letter_token_ids(backbone.tokenizer)
    return accuracy_report(rows, predict_letters(backbone, rows, collate, letter_ids, batch_size, device))
