"""Held-out scoring of a run's checkpoints: the loss per source, and accuracy where answers are scorable.

Every held-out row (the test split; val too with ``eval_val_loss``) adds the cross-entropy
of its response tokens under teacher forcing — the loss step 3 and the SFT-only baseline minimise —
to its source's sum: held-out loss = Σ nll / Σ response tokens per split and source, in nats per token.

A test row whose ``answer`` is an option letter (the synthetic task's scored questions; multiple-choice
rows of real data, whose letter the converters store) is also answered: the model's logits at the
first response position, restricted to the option letters' tokens, highest wins. That is greedy
decoding of the first answer token constrained to the valid options, so accuracy is exact and needs
no parsing. The options are the letters the test split's answers use (A–D for the synthetic task).
"""

from __future__ import annotations

import string
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence

import torch

from vlsi_ray.method.losses import verbalized_ce
from vlsi_ray.method.steps import model_inputs, response_positions
from vlsi_ray.models.backbone import Backbone


def is_letter(answer: object) -> bool:
    """Whether ``answer`` is an option letter (``"A"`` … ``"Z"``): the rows accuracy is scored on."""
    return isinstance(answer, str) and len(answer) == 1 and answer in string.ascii_uppercase


def option_letters(answers: Iterable[object]) -> str:
    """The options a scorable row is answered among: ``"ABCD"`` when the letter answers span A–D.

    Every letter from A to the last one used, so that an option nobody answered (a small test split)
    is still a choice the model can make.
    """
    used = [a for a in answers if is_letter(a)]
    return string.ascii_uppercase[: string.ascii_uppercase.index(max(used)) + 1] if used else ""


def letter_token_ids(tokenizer, letters: str) -> list[int]:
    """Token id of each option letter; raises if a letter is not a single token."""
    ids = []
    for letter in letters:
        tokens = tokenizer.encode(letter, add_special_tokens=False)
        if len(tokens) != 1:
            raise ValueError(
                f"option letter {letter!r} is {len(tokens)} tokens in this tokenizer; retrain it so option letters are single tokens."
            )
        ids.append(tokens[0])
    return ids


@torch.no_grad()
def score_rows(
    backbone: Backbone,
    rows: Sequence[dict],
    collate: Callable[[list[dict]], dict],
    batch_size: int,
    device: torch.device,
    letters: str,
    chunk_size: int = 1024,
) -> list[dict]:
    """One record per row: ``{"id", "split", "source", "task", "answer", "prediction", "nll", "tokens"}``.

    ``nll`` is the summed cross-entropy (nats) of the row's ``tokens`` response tokens; ``prediction``
    the option letter among ``letters`` the model ranks first at the first response position when the
    row's answer is a letter, else None. The LM head runs on response positions only (``[N, V]`` logits,
    ``chunk_size`` at a time), never over the whole ``[B, T, V]``.
    """
    backbone.model.eval()
    letter_ids = torch.tensor(letter_token_ids(backbone.tokenizer, letters), device=device) if letters else None
    records: list[dict] = []
    for start in range(0, len(rows), batch_size):
        chunk = list(rows[start : start + batch_size])
        batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in collate(chunk).items()}
        hidden = backbone.forward(model_inputs(batch), logits=False).hidden_states[-1]  # [B, T, d], normed
        mask, targets = response_positions(batch["labels"])
        counts = mask.sum(dim=1).tolist()
        with backbone.autocast():
            nll = verbalized_ce(hidden[mask], backbone.lm_head, targets, chunk_size).split(counts)  # B × [n_b]
            first = hidden[torch.arange(len(chunk), device=device), mask.float().argmax(dim=1)]  # [B, d]
            scores = backbone.lm_head(first)[:, letter_ids].float() if letter_ids is not None else None  # [B, letters]
        for b, row in enumerate(chunk):
            scorable = scores is not None and is_letter(row.get("answer")) and row.get("split") == "test"
            records.append(
                {
                    "id": row["id"],
                    "split": row.get("split"),
                    "source": row.get("source") or row.get("task"),
                    "task": row.get("task"),
                    "answer": row.get("answer"),
                    "prediction": letters[int(scores[b].argmax())] if scorable else None,
                    "nll": float(nll[b].sum()),
                    "tokens": int(counts[b]),
                }
            )
    return records


def heldout_report(records: Sequence[dict]) -> dict:
    """Accuracy and held-out loss of one model from its :func:`score_rows` records.

    Returns ``{"overall": acc, "per_task": {task: acc}, "per_source": {source: acc}, "n": scored rows,
    "loss": {split: {"all": loss, source: loss, ...}}, "tokens": {split: {source: response tokens}}}``;
    accuracies in [0, 1] over the rows with a prediction (``overall`` 0 when there are none), losses
    in nats per response token.
    """
    hits: dict[str, dict[str, list[bool]]] = {"task": defaultdict(list), "source": defaultdict(list)}
    nll: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    tokens: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for r in records:
        if r["prediction"] is not None:
            hits["task"][r["task"]].append(r["prediction"] == r["answer"])
            hits["source"][r["source"]].append(r["prediction"] == r["answer"])
        for source in ("all", r["source"]):
            nll[r["split"]][source] += r["nll"]
            tokens[r["split"]][source] += r["tokens"]
    every = [h for values in hits["task"].values() for h in values]
    rate = lambda values: sum(values) / len(values)  # noqa: E731
    return {
        "overall": sum(every) / max(1, len(every)),
        "per_task": {task: rate(v) for task, v in sorted(hits["task"].items())},
        "per_source": {source: rate(v) for source, v in sorted(hits["source"].items())},
        "n": len(every),
        "loss": {
            split: {s: nll[split][s] / max(1, n) for s, n in sorted(tokens[split].items(), key=lambda kv: kv[0] != "all")}
            for split in sorted(nll)
        },
        "tokens": {split: dict(sorted(tokens[split].items(), key=lambda kv: kv[0] != "all")) for split in sorted(tokens)},
    }


def summary_line(name: str, result: dict) -> str:
    """``[eval] <name>: 61.2% on 1000 test questions, held-out loss 0.842 (test)`` for the run's log."""
    losses = ", ".join(f"{v['all']:.3f} ({split})" for split, v in result["loss"].items())
    accuracy = f"{100 * result['overall']:.1f}% on {result['n']} test questions" if result["n"] else "no scorable test answers"
    return f"[eval] {name}: {accuracy}, held-out loss {losses}"
