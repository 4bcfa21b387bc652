"""Benchmark readers, answer extraction, scoring and resume — with a stub predictor (these tests are about scoring only)."""

from __future__ import annotations

import base64
import csv
import json

import pytest

from vlsi_ray.eval.benchmarks import MCQ_INSTRUCTION, YES_NO_INSTRUCTION, BenchmarkError, mcq_benchmark, yes_no_benchmark
from vlsi_ray.eval.harness import evaluate_benchmark, write_summary
from vlsi_ray.eval.scoring import extract_choice, extract_yes_no

OPTIONS = {"A": "red", "B": "green", "C": "blue", "D": "yellow"}


@pytest.mark.parametrize(
    "text, expected",
    [
        ("B", "B"),
        ("(B)", "B"),
        ("B.", "B"),
        ("B. green", "B"),
        ("B) green", "B"),
        ("(C) blue", "C"),
        ("D: yellow", "D"),
        ("Answer: B", "B"),
        ("The answer is (C).", "C"),
        ("the answer is D", "D"),
        ("Option A", "A"),
        ("I think it's C", "C"),
        ("**B**", "B"),
        (" B\n", "B"),
        ("blue", "C"),
        ("It is yellow.", "D"),
        ("A blue square", "C"),  # option text; "A" before a word is an article
        ("E", None),
        ("The answer is E", None),
        ("", None),
        ("xyz", None),
        ("red or blue", None),
        ("C and D", None),
        ("b", None),  # option letters are capitals
    ],
)
def test_extract_choice(text, expected):
    assert extract_choice(text, OPTIONS) == expected


def test_extract_choice_prefers_the_longest_option_text_and_ignores_absent_letters():
    assert extract_choice("dark red", {"A": "red", "B": "dark red"}) == "B"
    assert extract_choice("C", {"A": "x", "B": "y"}) is None


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Yes", "yes"),
        ("yes.", "yes"),
        ("NO", "no"),
        ("No, there is not.", "no"),
        ("Yes, there is a red star.", "yes"),
        ("yes and no", None),
        ("Not sure", None),
        ("Nope", None),
        ("", None),
    ],
)
def test_extract_yes_no(text, expected):
    assert extract_yes_no(text) == expected


# ----------------------------------------------------------------------------------------- readers
def test_mcq_reader_matches_what_the_generator_wrote(fixture_sets):
    bench = mcq_benchmark(fixture_sets.mcq)
    gold = fixture_sets.gold["mcq"]
    assert [(it.index, it.answer, it.categories) for it in bench.items] == [(i, a, c) for i, (a, c) in gold.items()]
    assert bench.skipped == {}
    with fixture_sets.mcq.open() as fh:
        rows = list(csv.DictReader(fh, delimiter="\t"))
    first, with_hint, no_d = bench.items[0], bench.items[1], bench.items[2]
    assert first.prompt == "\n".join([rows[0]["question"], *(f"{k}. {rows[0][k]}" for k in "ABCD"), MCQ_INSTRUCTION])
    assert with_hint.prompt.startswith(rows[1]["hint"] + "\n" + rows[1]["question"] + "\nA. ")
    assert list(no_d.options) == ["A", "B", "C"] and "\nD." not in no_d.prompt  # empty option cell = no option
    assert first.images[0] == base64.b64decode(rows[0]["image"])


def test_pope_tsv_and_jsonl_readers(fixture_sets):
    bench = yes_no_benchmark(fixture_sets.pope_tsv)
    assert {it.index: (it.answer, it.categories) for it in bench.items} == fixture_sets.gold["pope_tsv"]
    by_index = {it.index: it for it in bench.items}
    assert by_index["101"].images == by_index["100"].images  # "100" in the image cell refers to row 100's image
    with fixture_sets.pope_tsv.open() as fh:
        questions = {r["index"]: r["question"] for r in csv.DictReader(fh, delimiter="\t")}
    assert all(it.prompt == f"{questions[it.index]}\n{YES_NO_INSTRUCTION}" for it in bench.items)
    for path in fixture_sets.pope_jsonl:
        lines = yes_no_benchmark(path)
        assert {it.index: (it.answer, it.categories) for it in lines.items} == fixture_sets.gold[path.stem]
        for it in lines.items:  # the same question and image as in the TSV
            assert (it.prompt, it.images) == (by_index[it.index].prompt, by_index[it.index].images)


def _rewrite_tsv(src, dst, edit):
    with src.open() as fh:
        rows = list(csv.DictReader(fh, delimiter="\t"))
    rows, columns = edit(rows)
    with dst.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, columns, delimiter="\t", extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return dst


def test_bad_tsv_input_is_explained(fixture_sets, tmp_path):
    no_answer = _rewrite_tsv(fixture_sets.mcq, tmp_path / "no_answer.tsv", lambda r: (r, [c for c in r[0] if c != "answer"]))
    with pytest.raises(BenchmarkError, match=r"no_answer.tsv has no column\(s\) \['answer'\]"):
        mcq_benchmark(no_answer)

    def corrupt(rows):
        rows[3]["image"] = "!!not base64!!" * 10
        rows[5]["answer"] = "E"
        return rows, list(rows[0])

    bad = _rewrite_tsv(fixture_sets.mcq, tmp_path / "bad.tsv", corrupt)
    bench = mcq_benchmark(bad, on_error="skip")
    assert len(bench.items) == 8 and set(bench.skipped) == {"3", "5"}
    assert "base64" in bench.skipped["3"] and "'E' is not one of its options" in bench.skipped["5"]
    with pytest.raises(BenchmarkError, match=r"row '3' of .*bad.tsv: its image is not valid base64"):
        mcq_benchmark(bad, on_error="raise")


# ----------------------------------------------------------------------------------------- scoring
class StubPredictor:
    """Answers from a fixed table (index -> text) and records which items it was asked."""

    def __init__(self, answers: dict[str, str], chunk_size: int = 4, name: str = "stub", fail_after: int | None = None):
        self.answers, self.chunk_size, self.name, self.fail_after = answers, chunk_size, name, fail_after
        self.asked: list[str] = []

    def predict(self, items):
        if self.fail_after is not None and len(self.asked) >= self.fail_after:
            raise RuntimeError("simulated crash")
        self.asked += [it.index for it in items]
        return [self.answers[it.index] for it in items]


def _mcq_answers(gold):
    """Right for colour/position/shape (in several formats), a wrong letter for count, unparseable for pattern."""
    formats = ["{}", "({})", "{}. because", "Answer: {}"]
    answers = {}
    for n, (index, (letter, cats)) in enumerate(gold.items()):
        if cats == ["count"]:
            answers[index] = "ABCD"[("ABCD".index(letter) + 1) % 4]
        elif cats == ["pattern"]:
            answers[index] = "no idea"
        else:
            answers[index] = formats[n % 4].format(letter)
    return answers


def test_stub_scores_mcq_exactly_per_category(fixture_sets, tmp_path):
    gold = fixture_sets.gold["mcq"]
    result = evaluate_benchmark(mcq_benchmark(fixture_sets.mcq), StubPredictor(_mcq_answers(gold)), tmp_path, progress=False)
    assert (result["n"], result["correct"], result["accuracy"], result["unparsed"]) == (10, 6, 0.6, 2)
    assert {c: (v["n"], v["accuracy"]) for c, v in result["per_category"].items()} == {
        "colour": (2, 1.0),
        "count": (2, 0.0),
        "pattern": (2, 0.0),
        "position": (2, 1.0),
        "shape": (2, 1.0),
    }
    unparsed = [r["index"] for r in result["items"] if r["extracted"] is None]
    assert unparsed == [i for i, (_, c) in gold.items() if c == ["pattern"]]
    assert json.loads((tmp_path / "mcq.json").read_text())["accuracy"] == 0.6
    md = (tmp_path / "mcq.md").read_text()
    assert "| **overall** | 10 | 60.0 | 2 |" in md and "| count | 2 | 0.0 | 0 |" in md


def test_stub_scores_pope_with_f1(fixture_sets, tmp_path):
    gold = fixture_sets.gold["pope_tsv"]
    always_yes = StubPredictor({i: "Yes, there is." for i in gold})
    result = evaluate_benchmark(yes_no_benchmark(fixture_sets.pope_tsv), always_yes, tmp_path, progress=False)
    # 4 of 12 answers are yes: precision 1/3, recall 1, F1 0.5; each category holds the 4 yes + 4 of the noes
    assert result["accuracy"] == pytest.approx(4 / 12) and result["precision"] == pytest.approx(1 / 3)
    assert (result["recall"], result["f1"], result["yes_ratio"]) == (1.0, pytest.approx(0.5), 1.0)
    assert {c: (v["n"], v["accuracy"]) for c, v in result["per_category"].items()} == {
        "adversarial": (8, 0.5),
        "random": (8, 0.5),
    }
    summary = write_summary(tmp_path, [result]).read_text()
    assert "| pope | 12 | **33.3** | 0 | 50.0 |" in summary


def test_resume_predicts_only_missing_items(fixture_sets, tmp_path):
    bench = mcq_benchmark(fixture_sets.mcq)
    answers = _mcq_answers(fixture_sets.gold["mcq"])
    crashing = StubPredictor(answers, chunk_size=4, fail_after=4)  # answers one chunk, then the run dies
    with pytest.raises(RuntimeError, match="simulated crash"):
        evaluate_benchmark(bench, crashing, tmp_path, progress=False)
    saved = (tmp_path / "mcq.predictions.jsonl").read_text().splitlines()
    assert [json.loads(line)["index"] for line in saved] == ["0", "1", "2", "3"]
    with (tmp_path / "mcq.predictions.jsonl").open("a") as fh:  # a line cut short by the crash
        fh.write('{"index": "4", "predic')

    resumed = StubPredictor(answers)
    result = evaluate_benchmark(bench, resumed, tmp_path, progress=False)
    assert resumed.asked == ["4", "5", "6", "7", "8", "9"]
    assert (result["n"], result["accuracy"]) == (10, 0.6)
    again = StubPredictor(answers)
    evaluate_benchmark(bench, again, tmp_path, progress=False)
    assert again.asked == []
    with pytest.raises(ValueError, match="holds answers of model 'stub', not 'other'"):
        evaluate_benchmark(bench, StubPredictor(answers, name="other"), tmp_path, progress=False)
