"""ChatGenerator: per-row sampling statistics, stop strings, streaming pieces that add up, request parsing."""

from __future__ import annotations

import base64
import io
import json

import pytest
import torch
from PIL import Image

from vlsi_ray.data.shards import read_rows
from vlsi_ray.generation import ChatGenerator, SamplingParams, _undecided_tail_removed, sample_token
from vlsi_ray.serve.config import Limits
from vlsi_ray.serve.openai_api import APIError, decode_image, parse_body, parse_chat_request


def test_sample_token_matches_the_softmax_and_respects_the_nucleus():
    scores = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    g = torch.Generator().manual_seed(0)
    draws = torch.tensor([sample_token(scores, 1.0, 1.0, g) for _ in range(4000)])
    freq = torch.bincount(draws, minlength=4).float() / len(draws)
    assert torch.allclose(freq, torch.tensor([0.5, 0.3, 0.15, 0.05]), atol=0.03), freq
    # top_p=0.7: the nucleus is {0, 1} (0.5 < 0.7 <= 0.8), renormalised to 0.625 / 0.375.
    draws = torch.tensor([sample_token(scores, 1.0, 0.7, g) for _ in range(4000)])
    freq = torch.bincount(draws, minlength=4).float() / len(draws)
    assert freq[2] == 0 and freq[3] == 0 and abs(freq[0] - 0.625) < 0.03
    # temperature 0.5 squares the odds: 0.5² : 0.3² : ... renormalised.
    sharp = torch.tensor([0.5, 0.3, 0.15, 0.05]) ** 2
    draws = torch.tensor([sample_token(scores, 0.5, 1.0, g) for _ in range(4000)])
    freq = torch.bincount(draws, minlength=4).float() / len(draws)
    assert torch.allclose(freq, sharp / sharp.sum(), atol=0.03)


@pytest.mark.parametrize(
    "text,stops,kept",
    [
        ("The answer is A", ["\n\n"], "The answer is A"),
        ("The answer\n", ["\n\n"], "The answer"),  # "\n" may become the stop string "\n\n"
        ("ab END", ["ENDING", "xy"], "ab "),
        ("café\ufffd", [], "café"),
    ],
)
def test_undecided_tail_is_held_back(text, stops, kept):
    assert _undecided_tail_removed(text, stops) == kept


@pytest.fixture(scope="module")
def generator(tiny_run):
    return ChatGenerator.from_pretrained(tiny_run.run / "sft" / "student")


@pytest.fixture(scope="module")
def rows(tiny_run):
    return read_rows(tiny_run.data, split="test")[0][:3]


def test_streamed_pieces_add_up_and_batching_keeps_greedy_answers(generator, rows):
    alone = [generator.generate([r], SamplingParams(max_tokens=10))[0] for r in rows]
    pieces = [""] * len(rows)

    def on_step(deltas):
        for i, d in enumerate(deltas):
            if d is not None:
                pieces[i] += d[0]

    together = generator.generate(rows, SamplingParams(max_tokens=10), on_step=on_step)
    assert [c.text for c in together] == [c.text for c in alone] == pieces
    assert all(c.completion_tokens <= 10 for c in together)
    assert [c.prompt_tokens for c in together] == [generator.prompt_tokens(r) for r in rows]


def test_stop_strings_max_tokens_and_seeds(generator, rows):
    full = generator.generate(rows[:1], SamplingParams(max_tokens=12))[0]
    assert len(full.text) > 2, "the tiny untrained model should produce some text"
    stop = full.text[2:4]
    cut = generator.generate(rows[:1], SamplingParams(max_tokens=12, stop=(stop,)))[0]
    assert cut.text == full.text[: full.text.find(stop)] and cut.finish_reason == "stop"
    one = generator.generate(rows[:1], SamplingParams(max_tokens=1))[0]
    assert one.completion_tokens == 1 and one.finish_reason == "length"
    hot = [SamplingParams(max_tokens=8, temperature=1.5, seed=s) for s in (1, 1, 2)]
    a, b, c = generator.generate(rows[:1] * 3, hot)
    assert a.text == b.text  # same seed, same sample, even side by side in one batch
    assert (
        len({generator.generate(rows[:1], SamplingParams(max_tokens=8, temperature=1.5, seed=s))[0].text for s in range(6)}) > 1
    )


def test_min_tokens_holds_back_the_end_of_turn(e2e_run):
    """The trained tiny student ends its turn at once on greedy decoding; with min_tokens=3 it answers with
    at least 3 tokens, the first being its best token other than the end of turn."""
    generator = ChatGenerator.from_pretrained(e2e_run.cfg.run_dir / "sft" / "student")
    row = read_rows(e2e_run.cfg.data.dir, split="test")[0][:1]
    plain = generator.generate(row, SamplingParams(max_tokens=5))[0]
    held = generator.generate(row, SamplingParams(max_tokens=5, min_tokens=3))[0]
    assert (plain.completion_tokens, plain.finish_reason) == (0, "stop")
    assert held.completion_tokens >= 3 and len(held.token_ids) == held.completion_tokens
    b = generator.backbone
    with torch.no_grad():
        logits = b.model(**b.model_inputs(generator.collator(row))).logits[0, -1].float()
    logits[b.eos_token_id] = float("-inf")
    assert held.token_ids[0] == int(logits.argmax())
    with pytest.raises(ValueError, match=r"min_tokens must be in \[0, max_tokens=5\], got 6"):
        SamplingParams(max_tokens=5, min_tokens=6)


def _png(size=(8, 8)) -> str:
    buf = io.BytesIO()
    Image.new("RGB", size, "red").save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _body(**extra):
    return {
        "model": "m",
        "messages": [
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": _png()}}, {"type": "text", "text": "hi"}]}
        ],
        **extra,
    }


def test_request_becomes_a_training_style_row():
    chat = parse_chat_request(_body(max_tokens=5, stop="\n", temperature=0.7, seed=3), "m", Limits(), 64)
    assert chat.row["messages"] == [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "hi"}]}]
    assert len(chat.row["images"]) == 1 and chat.row["images"][0][:4] == b"\x89PNG"
    assert chat.params == SamplingParams(max_tokens=5, temperature=0.7, top_p=1.0, stop=("\n",), seed=3)
    assert (
        parse_chat_request({"model": "m", "messages": [{"role": "user", "content": "x"}]}, "m", Limits(), 7).params.max_tokens
        == 7
    )


@pytest.mark.parametrize(
    "body,status,param",
    [
        (_body(model="other"), 404, "model"),
        (_body(max_tokens="ten"), 400, "max_tokens"),
        (_body(max_tokens=5000), 400, "max_tokens"),
        (_body(temperature=True), 400, "temperature"),
        (_body(top_p=0), 400, "top_p"),
        (_body(n=2), 400, "n"),
        (_body(stop=[1]), 400, "stop"),
        (_body(stream="yes"), 400, "stream"),
        ({"model": "m", "messages": []}, 400, "messages"),
        ({"model": "m", "messages": [{"role": "robot", "content": "x"}]}, 400, "messages[0]"),
        ({"model": "m", "messages": [{"role": "user", "content": [{"type": "audio"}]}]}, 400, "messages[0].content[0].type"),
        ({"model": "m", "messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]}, 400, "messages"),
    ],
)
def test_bad_fields_are_named(body, status, param):
    with pytest.raises(APIError) as err:
        parse_chat_request(body, "m", Limits(), 64)
    assert (err.value.status, err.value.param) == (status, param)
    assert json.dumps(err.value.body())  # serialisable OpenAI-style error


def test_bad_images_and_bodies():
    limits = Limits(max_image_pixels=100, max_body_bytes=50)
    with pytest.raises(APIError, match="not valid base64"):
        decode_image("data:image/png;base64,@@@", "img", limits)
    with pytest.raises(APIError, match="does not decode as an image"):
        decode_image("data:image/png;base64," + base64.b64encode(b"not an image").decode(), "img", limits)
    with pytest.raises(APIError, match="over the limit of 100"):
        decode_image(_png((20, 20)), "img", limits)
    with pytest.raises(APIError, match="remote URL"):
        decode_image("https://example.com/cat.png", "img", limits)
    assert parse_body(b'{"a": 1}', limits) == {"a": 1}
    with pytest.raises(APIError) as err:
        parse_body(b"{" * 60, limits)
    assert err.value.status == 413
    with pytest.raises(APIError, match="not valid JSON"):
        parse_body(b"{oops", Limits())
