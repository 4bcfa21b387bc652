"""Offline BPE tokenizer: family chat templates, single-token option letters, save/load round trip."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import json

import pytest

from vlsi_ray.models.backbone import get_family
from vlsi_ray.models.tokenizer import train_tokenizer

QUESTION = "What colour is the star?\nA. red\nB. green\nC. blue\nD. yellow\nAnswer with the option's letter."
MESSAGES = [
    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]},
    {"role": "assistant", "content": [{"type": "text", "text": "B"}]},
]
TEXTS = [QUESTION, "red star top left. blue square with a dot bottom right.", "A", "B", "C", "D"] * 20
_QWEN_USER = (
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    f"<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>{QUESTION}<|im_end|>\n"
)
#: (user turn, generation prompt, the assistant turn as rendered) of each family's released template:
#: llava-hf's renders "assistant " + "\n" + text and no newline between turns.
EXPECTED = {
    "qwen2_vl": (_QWEN_USER, "<|im_start|>assistant\n", "<|im_start|>assistant\nB<|im_end|>\n"),
    "qwen2_5_vl": (_QWEN_USER, "<|im_start|>assistant\n", "<|im_start|>assistant\nB<|im_end|>\n"),
    "llava_onevision": (
        f"<|im_start|>user <image>\n{QUESTION}<|im_end|>",
        "<|im_start|>assistant\n",
        "<|im_start|>assistant \nB<|im_end|>",
    ),
}


@pytest.fixture(scope="module", params=list(EXPECTED))
def family_tokenizer(request):
    return request.param, train_tokenizer(TEXTS, request.param, vocab_size=512)


def test_chat_template_renders_the_family_format(family_tokenizer):
    family, tok = family_tokenizer
    user, generation_prompt, answer = EXPECTED[family]
    assert tok.apply_chat_template(MESSAGES[:1], tokenize=False, add_generation_prompt=True) == user + generation_prompt
    assert tok.apply_chat_template(MESSAGES, tokenize=False) == user + answer
    assert tok.apply_chat_template(MESSAGES[:1], tokenize=False) == user


def test_option_letters_are_single_tokens(family_tokenizer):
    _, tok = family_tokenizer
    ids = [tok.encode(letter, add_special_tokens=False) for letter in "ABCD"]
    assert all(len(i) == 1 for i in ids)
    assert len({i[0] for i in ids}) == 4
    # and the answer after the generation prompt is the same single token
    full = tok(tok.apply_chat_template(MESSAGES, tokenize=False), add_special_tokens=False)["input_ids"]
    end = tok("<|im_end|>" + ("\n" if full[-1] != tok.convert_tokens_to_ids("<|im_end|>") else ""), add_special_tokens=False)[
        "input_ids"
    ]
    assert full[-len(end) - 1] == ids[1][0]


def test_special_tokens_follow_the_bpe_vocabulary_in_real_order(family_tokenizer):
    family, tok = family_tokenizer
    spec = get_family(family)
    ids = [tok.convert_tokens_to_ids(t) for t in spec.special_tokens]
    assert ids == list(range(len(tok) - len(spec.special_tokens), len(tok)))
    assert len(tok) <= 512
    assert tok.pad_token == "<|endoftext|>" and tok.eos_token == "<|im_end|>"
    assert tok.bos_token is None
    for special in spec.special_tokens:  # never split, never merged with text
        assert tok.encode(f"x{special}y", add_special_tokens=False)[1] == tok.convert_tokens_to_ids(special)


def test_save_load_round_trip(family_tokenizer, tmp_path):
    from transformers import AutoTokenizer  # noqa: PLC0415 (transformers loads on use (after the offline defaults are set))

    _, tok = family_tokenizer
    tok.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path, local_files_only=True)
    text = tok.apply_chat_template(MESSAGES, tokenize=False)
    assert loaded.get_vocab() == tok.get_vocab()
    assert loaded(text, add_special_tokens=False)["input_ids"] == tok(text, add_special_tokens=False)["input_ids"]
    assert loaded.apply_chat_template(MESSAGES, tokenize=False) == text
    assert (loaded.pad_token_id, loaded.eos_token_id) == (tok.pad_token_id, tok.eos_token_id)
    assert loaded.decode(tok.encode(QUESTION, add_special_tokens=False)) == QUESTION


def test_deterministic_training():
    a = train_tokenizer(TEXTS, "qwen2_vl", vocab_size=400)
    b = train_tokenizer(TEXTS, "qwen2_vl", vocab_size=400)
    assert a.get_vocab() == b.get_vocab()
    assert len(a) <= 400


def test_bad_arguments_are_explained():
    with pytest.raises(ValueError, match="vocab_size=100"):
        train_tokenizer(TEXTS, "qwen2_vl", vocab_size=100)
    with pytest.raises(ValueError, match="family 'idefics3' is not supported"):
        train_tokenizer(TEXTS, "idefics3")
    with pytest.raises(TypeError, match="pass strings only"):
        train_tokenizer([json.dumps(MESSAGES), b"bytes"], "qwen2_vl")
