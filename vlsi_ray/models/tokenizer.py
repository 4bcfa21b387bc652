"""A tiny byte-level BPE tokenizer with a VLM family's special tokens and chat template, trained offline.

Layout mirrors the real Qwen2 tokenizers: the BPE vocabulary first (256 byte symbols, then merges),
the family's special tokens appended after it in the real id order, no BOS, ``<|endoftext|>`` as pad
and ``<|im_end|>`` as end of turn. The pre-tokenizer is Qwen2's regex (digits split one by one,
letters kept with one leading non-letter), so option letters ``A``–``D`` are always single tokens.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

from vlsi_ray.models.backbone import get_family

#: Qwen2's pre-tokenization pattern (tokenizer.json of Qwen2 / Qwen2-VL).
QWEN2_PATTERN = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"


def _template_texts(family: str) -> list[str]:
    """The chat template's own words, so that role names and the system prompt merge too."""
    # transformers' own jinja set-up, which knows {% generation %}
    from transformers.utils.chat_template_utils import _compile_jinja_template  # noqa: PLC0415 - loads on use

    spec = get_family(family)
    template = _compile_jinja_template(spec.chat_template)
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe the image."}]},
        {"role": "assistant", "content": [{"type": "text", "text": "A."}]},
    ]
    text = template.render(messages=messages, add_generation_prompt=True)
    for token in spec.special_tokens:
        text = text.replace(token, "\n")
    return [text] * 8


def _corpus(texts: Iterable[str], family: str) -> Iterator[str]:
    yield from _template_texts(family)
    for text in texts:
        if not isinstance(text, str):
            raise TypeError(f"train_tokenizer got a {type(text).__name__} in texts; pass strings only.")
        yield text


def train_tokenizer(texts: Iterable[str], family: str, vocab_size: int = 512):
    """Train a ByteLevel BPE on ``texts`` and wrap it as the ``family``'s ``PreTrainedTokenizerFast``.

    ``vocab_size`` bounds ``len(tokenizer)`` (BPE symbols + the family's special tokens); a small
    corpus may stop earlier once every word is one token. The chat template, pad/eos tokens and
    ``image_token`` are set; the model-side head size is chosen by the model builder.
    """
    from transformers import PreTrainedTokenizerFast  # noqa: PLC0415 - transformers loads on use, after the offline defaults

    spec = get_family(family)
    bpe_size = vocab_size - len(spec.special_tokens)
    if bpe_size < 256:
        raise ValueError(
            f"vocab_size={vocab_size} leaves no room for the 256 byte symbols and {len(spec.special_tokens)} special tokens; use at least {256 + len(spec.special_tokens)}."
        )
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])  # fmt: skip
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=bpe_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[], show_progress=False
    )
    backend.train_from_iterator(_corpus(texts, family), trainer=trainer)
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in spec.special_tokens])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=spec.pad_token,
        eos_token=spec.eos_token,
        extra_special_tokens={"image_token": spec.image_token},
        chat_template=spec.chat_template,
        model_max_length=32768,
        padding_side="right",
    )
    return tokenizer
