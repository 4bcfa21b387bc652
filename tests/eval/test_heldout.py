"""The run report's held-out scoring: loss per source and option-letter accuracy, against references
computed here from the model's full logits."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from vlsi_ray.data.collate import IGNORE_INDEX, ChatCollator
from vlsi_ray.eval.heldout import heldout_report, is_letter, option_letters, score_rows, summary_line
from vlsi_ray.models import qwen2_vl
from vlsi_ray.models.tokenizer import train_tokenizer

QUESTION = "What colour is it?\nA. red\nB. green\nC. blue\nD. yellow\nAnswer with the option's letter."
SUM = "What is 2 + 3? Explain briefly."
EXPLANATION = "2 plus 3 makes 5, so the answer is 5."


def _row(i: int, source: str, question: str, answer: str, split: str = "test", letter: str | None = None) -> dict:
    messages = [
        {"role": "user", "content": [{"type": "text", "text": question}]},
        {"role": "assistant", "content": [{"type": "text", "text": answer}]},
    ]
    return {"id": f"{source}/{i}", "images": [], "messages": json.dumps(messages), "answer": letter, "task": source,
            "source": source, "split": split}  # fmt: skip


@pytest.fixture(scope="module")
def tiny():
    tok = train_tokenizer([QUESTION, SUM, EXPLANATION, "A", "B", "C", "D"] * 20, "qwen2_vl")
    torch.manual_seed(0)
    model = qwen2_vl.build_tiny("student", tok)
    return model, ChatCollator(tok, model.image_processor, "qwen2_vl")


def test_losses_and_letters_equal_a_full_logits_reference(tiny):
    model, collate = tiny
    rows = [_row(i, "mcq", QUESTION, letter, letter=letter) for i, letter in enumerate("ABCDA")]
    rows += [_row(i, "math", SUM, EXPLANATION) for i in range(3)] + [_row(9, "mcq", QUESTION, "C", split="val", letter="C")]
    records = score_rows(model, rows, collate, batch_size=3, device=torch.device("cpu"), letters="ABCD")

    letter_ids = [collate.tokenizer.convert_tokens_to_ids(c) for c in "ABCD"]
    with torch.no_grad():
        for row, record in zip(rows, records):
            batch = collate([row])
            logits = model.forward(batch).logits[0].float()  # [T, V]
            labels = batch["labels"][0]
            positions = (labels[1:] != IGNORE_INDEX).nonzero().flatten()  # positions predicting a response token
            nll = F.cross_entropy(logits[positions], labels[positions + 1], reduction="sum")
            assert record["tokens"] == len(positions) and record["nll"] == pytest.approx(float(nll), rel=1e-4)
            expected = (
                "ABCD"[int(logits[positions[0], letter_ids].argmax())] if row["split"] == "test" and row["answer"] else None
            )
            assert record["prediction"] == expected
            assert (record["id"], record["source"], record["split"]) == (row["id"], row["source"], row["split"])


def test_report_sums_per_source_and_scores_letters_only():
    records = [
        {
            "id": "a/0",
            "split": "test",
            "source": "a",
            "task": "colour",
            "answer": "B",
            "prediction": "B",
            "nll": 3.0,
            "tokens": 2,
        },
        {
            "id": "a/1",
            "split": "test",
            "source": "a",
            "task": "colour",
            "answer": "C",
            "prediction": "A",
            "nll": 5.0,
            "tokens": 2,
        },
        {"id": "a/2", "split": "test", "source": "a", "task": "count", "answer": "D", "prediction": "D", "nll": 1.0, "tokens": 2},
        {"id": "b/0", "split": "test", "source": "b", "task": "b", "answer": None, "prediction": None, "nll": 12.0, "tokens": 10},
        {"id": "b/1", "split": "val", "source": "b", "task": "b", "answer": None, "prediction": None, "nll": 4.0, "tokens": 8},
    ]
    report = heldout_report(records)
    assert report["n"] == 3 and report["overall"] == pytest.approx(2 / 3)
    assert report["per_task"] == {"colour": 0.5, "count": 1.0} and report["per_source"] == {"a": pytest.approx(2 / 3)}
    assert report["loss"] == {"test": {"all": 21.0 / 16, "a": 9.0 / 6, "b": 12.0 / 10}, "val": {"all": 0.5, "b": 0.5}}
    assert list(report["loss"]["test"]) == ["all", "a", "b"] and report["tokens"]["test"] == {"all": 16, "a": 6, "b": 10}
    assert summary_line("vlsi", report) == "[eval] vlsi: 66.7% on 3 test questions, held-out loss 1.312 (test), 0.500 (val)"
    empty = heldout_report([r for r in records if r["source"] == "b"])
    assert (empty["n"], empty["overall"], empty["per_source"]) == (0, 0.0, {})
    assert "no scorable test answers" in summary_line("vlsi", empty)
    assert math.isclose(empty["loss"]["test"]["b"], 1.2)


def test_option_letters_span_a_to_the_last_used():
    assert option_letters(["B", None, "D", "a caption", "A"]) == "ABCD"
    assert option_letters(["E", "B"]) == "ABCDE"
    assert option_letters([None, "two"]) == ""
    assert [is_letter(x) for x in ("A", "a", "AB", None, "")] == [True, False, False, False, False]
