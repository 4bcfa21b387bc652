"""Answer extraction from free text and accuracy tables (overall, per category; precision/recall/F1 for yes/no).

An answer that cannot be parsed is recorded (``extracted: null``) and counted wrong, never dropped.
Yes/no metrics take "yes" as the positive class; an unparsed answer counts as "not yes", as in
VLMEvalKit's ``POPE_rating``.
"""

from __future__ import annotations

import re
import string
from collections.abc import Sequence

from vlsi_ray.eval.benchmarks import YES_NO, Item

_KEYWORD = r"(?i:answer|option|choice)"
_PUNCT = re.compile(f"[{re.escape(string.punctuation)}]")


def extract_choice(text: str, options: dict[str, str]) -> str | None:
    """The option letter that free text ``text`` picks among ``options`` ({letter: option text}), or None.

    Tried in order: the whole answer is a letter (``"B"``, ``"(B)"``); a leading letter with
    punctuation (``"B."``, ``"B)"``, ``"(B) blue"``, ``"B: blue"``); ``"Answer: B"`` / ``"the answer is
    (B)"`` / ``"option B"``; exactly one ``"(X)"``; exactly one option's text as whole words (the
    longest wins when one option's text contains another's); exactly one standalone capital letter
    (an article "A" before a lower-case word does not count). Letters outside ``options`` never match.
    """
    text = text.strip()
    if not text or not options:
        return None
    cls = "[" + "".join(re.escape(k) for k in options) + "]"
    for pattern in (rf"^\(?({cls})\)?$", rf"^\(?({cls})\s*[.):](?:\s|$)", rf"{_KEYWORD}(?:\s+is)?\s*:?\s*\(?({cls})(?![\w'])"):
        found = re.search(pattern, text)
        if found:
            return found.group(1)
    for found in (
        {m for m in re.findall(rf"\(({cls})\)", text)},
        _option_text_matches(text, options),
        {
            m.group(1)
            for m in re.finditer(rf"(?<![\w'])({cls})(?![\w'])", text)
            if not (m.group(1) == "A" and re.match(r"\s+[a-z]", text[m.end() :]))
        },
    ):
        if len(found) == 1:
            return found.pop()
    return None


def _option_text_matches(text: str, options: dict[str, str]) -> set[str]:
    lower = text.lower()
    hits = {
        k: v.lower().strip()
        for k, v in options.items()
        if v.strip() and re.search(rf"(?<!\w){re.escape(v.lower().strip())}(?!\w)", lower)
    }
    # "dark red" and "red" both match "dark red": keep options not contained in another hit
    return {k for k, v in hits.items() if not any(v != w and v in w for w in hits.values())}


def extract_yes_no(text: str) -> str | None:
    """``"yes"``/``"no"`` when exactly one of the two words occurs in ``text`` (punctuation ignored), else None.

    The rule of VLMEvalKit's ``YOrN_Extraction``: "Yes, there is." -> yes; "No." -> no; "yes and no" -> None.
    """
    words = set(_PUNCT.sub(" ", text.lower()).split())
    if ("yes" in words) == ("no" in words):
        return None
    return "yes" if "yes" in words else "no"


def score_item(item: Item, prediction: str) -> dict:
    """One scored record: index, categories, gold answer, raw prediction, extracted answer, correct."""
    extracted = extract_yes_no(prediction) if item.kind == YES_NO else extract_choice(prediction, item.options)
    return {
        "index": item.index,
        "categories": item.categories,
        "answer": item.answer,
        "prediction": prediction,
        "extracted": extracted,
        "correct": extracted == item.answer,
    }


def summarize(scored: Sequence[dict], yes_no: bool = False) -> dict:
    """``{n, correct, accuracy, unparsed, per_category: {cat: {...}}}`` (+ ``precision, recall, f1, yes_ratio`` for yes/no).

    An item in several categories counts once in each of them and once overall.
    """
    out = _counts(scored, yes_no)
    categories = sorted({c for r in scored for c in r["categories"]})
    out["per_category"] = {c: _counts([r for r in scored if c in r["categories"]], yes_no) for c in categories}
    return out


def _counts(scored: Sequence[dict], yes_no: bool) -> dict:
    n = len(scored)
    correct = sum(r["correct"] for r in scored)
    out = {
        "n": n,
        "correct": correct,
        "accuracy": correct / n if n else 0.0,
        "unparsed": sum(r["extracted"] is None for r in scored),
    }
    if yes_no:
        tp = sum(r["extracted"] == "yes" and r["answer"] == "yes" for r in scored)
        predicted_yes = sum(r["extracted"] == "yes" for r in scored)
        gold_yes = sum(r["answer"] == "yes" for r in scored)
        precision = tp / predicted_yes if predicted_yes else 0.0
        recall = tp / gold_yes if gold_yes else 0.0
        out.update(
            precision=precision,
            recall=recall,
            f1=2 * precision * recall / (precision + recall) if precision + recall else 0.0,
            yes_ratio=predicted_yes / n if n else 0.0,
        )
    return out


def results_markdown(results: Sequence[dict]) -> str:
    """A Markdown page: one summary table over all sets, then one per-category table per set."""
    lines = [
        f"# Evaluation of `{results[0]['model']}`" if results else "# Evaluation",
        "",
        "| set | items | accuracy | unparsed | F1 (yes/no) |",
        "|---|---|---|---|---|",
    ]
    for r in results:
        f1 = f"{100 * r['f1']:.1f}" if "f1" in r else "–"
        lines.append(f"| {r['dataset']} | {r['n']} | **{100 * r['accuracy']:.1f}** | {r['unparsed']} | {f1} |")
    for r in results:
        yes_no = "f1" in r
        lines += [
            "",
            f"## {r['dataset']} ({r['format']}, {r['n']} items)",
            "",
            "| category | items | accuracy | unparsed |" + (" precision | recall | F1 |" if yes_no else ""),
            "|---|---|---|---|" + ("---|---|---|" if yes_no else ""),
        ]
        for name, c in [("**overall**", r), *r["per_category"].items()]:
            row = f"| {_cell(name)} | {c['n']} | {100 * c['accuracy']:.1f} | {c['unparsed']} |"
            if yes_no:
                row += f" {100 * c['precision']:.1f} | {100 * c['recall']:.1f} | {100 * c['f1']:.1f} |"
            lines.append(row)
        if r.get("skipped_rows"):
            lines += ["", f"{len(r['skipped_rows'])} unusable rows skipped (see `skipped_rows` in the JSON)."]
    return "\n".join(lines) + "\n"


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")
