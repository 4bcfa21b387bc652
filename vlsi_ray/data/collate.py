"""The one collate path: chat rows -> model batches, for training, evaluation, teacher and student.

A row is ``{"id", "images": [encoded image bytes, ...] (zero or more), "messages": HF chat JSON, ...}``
(:data:`vlsi_ray.data.shards.SCHEMA`).
The family's chat template renders the conversation; each image part becomes the family's
placeholder token repeated as many times as the vision tower will produce features (Qwen2-VL: 16
for a 112-px image, LLaVA-OneVision tiny: 36). Labels are -100 except the tokens of each assistant
turn up to and including its end-of-turn token (the newline after ``<|im_end|>`` is not a label).

Under ZeRO-3 (and ZeRO-2 with a trained projector) every rank must run the vision tower on every
micro-batch: its parameters are gathered (and its gradients reduced) by collectives that all ranks
enter together, so a rank whose micro-batch is text-only would wait forever. With ``vision_filler``
a batch without images gets one blank image whose placeholder tokens are appended to its first row
with attention mask 0 and labels -100: the tower runs, no real token attends to it, and no loss
position sees it (LLaMA-Factory's "fake image" for the same hang).

Training/eval batches are right-padded; ``prompt_only`` batches (for ``generate``) drop the
assistant turns, end with the generation prompt (``<|im_start|>assistant\\n``), are left-padded and
carry no labels. Processed images are cached per image bytes because every epoch sees them again.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image
from torch import Tensor

from vlsi_ray.models.backbone import get_family

IGNORE_INDEX = -100
#: What ``data.max_length`` does to a row (:func:`length_verdict`): kept whole, kept with the end of its
#: answer cut, kept with no response token left, or refused as a bad row (its image tokens would be cut).
FITS, ANSWER_CUT, NO_ANSWER, REFUSED = "fits", "answer cut", "no answer left", "refused"
#: Stands in for an assistant turn's text to find where a template puts it (see ChatCollator._segments).
_SENTINEL = "\u2063vlsi-response\u2063"
#: Side in pixels of the blank image a ``vision_filler`` collator adds to a batch without images.
FILLER_SIZE = 28


class RowError(ValueError):
    """A data row cannot be collated; the message names the row id."""


class ChatCollator:
    """Callable ``rows -> batch`` shared by every model of one family (teacher and student alike).

    Returns ``input_ids [B, T]``, ``attention_mask [B, T]``, ``labels [B, T]`` (not in prompt-only
    mode), ``ids`` (list of row ids) and the family's vision inputs: Qwen2-VL ``pixel_values
    [Σ patches, 1176]``, ``image_grid_thw [N, 3]``, ``mm_token_type_ids [B, T]``; LLaVA-OneVision
    ``pixel_values [N, crops, 3, S, S]``, ``image_sizes [N, 2]`` (``N`` = images in the batch).
    ``vision_filler``: a batch without images gets a blank image, masked out (see the module docstring).
    """

    def __init__(
        self,
        tokenizer,
        image_processor,
        family: str,
        max_length: int | None = None,
        prompt_only: bool = False,
        cache_size: int = 2048,
        vision_filler: bool = False,
    ):
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.family = family
        self.max_length = max_length
        self.prompt_only = prompt_only
        self.cache_size = cache_size
        self.vision_filler = vision_filler
        spec = get_family(family)
        self.image_token_id = tokenizer.convert_tokens_to_ids(spec.image_token)
        self.eos_token_id = tokenizer.convert_tokens_to_ids(spec.eos_token)
        self.pad_token_id = tokenizer.pad_token_id
        if tokenizer.chat_template is None:
            tokenizer.chat_template = spec.chat_template
        self._cache: OrderedDict[bytes, dict[str, Tensor]] = OrderedDict()
        # Tokenized text per distinct conversation: rendering the chat template dominates a row's
        # collation, and a dataset repeats conversations (the synthetic task's questions, system
        # prompts): (ids, labels, image parts).
        self._text: OrderedDict[tuple, tuple[list[int], list[int], int]] = OrderedDict()

    @property
    def spec(self):
        return get_family(self.family)

    def __getstate__(self) -> dict:
        # Shipped to Ray workers as a collate_fn: leave the image cache behind.
        return {**self.__dict__, "_cache": OrderedDict(), "_text": OrderedDict()}

    # ----- public ---------------------------------------------------------------------------------
    def __call__(self, rows: Sequence[dict] | dict[str, Sequence], prompt_only: bool | None = None) -> dict[str, Any]:
        """Collate ``rows`` (a list of row dicts, or a dict of columns as Ray Data passes them)."""
        rows = _as_rows(rows)
        if not rows:
            raise ValueError("ChatCollator got an empty batch; pass at least one row.")
        prompt_only = self.prompt_only if prompt_only is None else prompt_only
        encoded = [self.encode(row, prompt_only) for row in rows]
        images = [image for _, _, row_images in encoded for image in row_images]
        filler = self._filler() if self.vision_filler and not prompt_only and not images else None
        width = max(len(ids) for ids, _, _ in encoded)
        if filler is not None:
            width = max(width, len(encoded[0][0]) + filler[1])
        batch_size = len(rows)
        input_ids = torch.full((batch_size, width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((batch_size, width), dtype=torch.long)
        labels = torch.full((batch_size, width), IGNORE_INDEX, dtype=torch.long)
        for i, (ids, labs, _) in enumerate(encoded):
            span = slice(width - len(ids), width) if prompt_only else slice(0, len(ids))
            input_ids[i, span] = torch.tensor(ids)
            attention_mask[i, span] = 1
            labels[i, span] = torch.tensor(labs)
        if filler is not None:  # masked placeholders after row 0's tokens: attention mask 0, labels -100
            start = len(encoded[0][0])
            input_ids[0, start : start + filler[1]] = self.image_token_id
            images = [filler[0]]
        batch: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention_mask}
        if not prompt_only:
            batch["labels"] = labels
        if images:
            batch.update(self.spec.batch_vision(images))
            if self.spec.uses_mm_token_type_ids:
                batch["mm_token_type_ids"] = ((input_ids == self.image_token_id) & attention_mask.bool()).int()
        batch["ids"] = [str(row.get("id")) for row in rows]
        return batch

    def encode(self, row: dict, prompt_only: bool = False) -> tuple[list[int], list[int], list[dict[str, Tensor]]]:
        """One row -> ``(input_ids, labels, processed images)`` with image placeholders expanded."""
        row_id = row.get("id")
        images = _image_bytes(row)
        raw = row.get("messages")
        key = (raw if isinstance(raw, (str, bytes)) else json.dumps(raw, sort_keys=True, default=str), prompt_only)
        text = self._text.get(key)
        if text is None:
            text = self._tokenize(_messages(row, row_id), prompt_only, row_id)
            self._text[key] = text
            if len(self._text) > 4 * self.cache_size:
                self._text.popitem(last=False)
        else:
            self._text.move_to_end(key)
        ids, labels, parts = list(text[0]), list(text[1]), text[2]
        if parts != len(images):
            raise RowError(
                f"row {row_id}: messages have {parts} image parts but the row has {len(images)} images; make them match."
            )
        processed = [self._process(data, row_id) for data in images]
        ids, labels = self._expand_images(ids, labels, processed, row_id)
        if self.max_length is not None and len(ids) > self.max_length:
            ids, labels = self._truncate(ids, labels, prompt_only, row_id)
        return ids, labels, processed

    # ----- pieces ---------------------------------------------------------------------------------
    def _tokenize(self, messages: list[dict], prompt_only: bool, row_id) -> tuple[list[int], list[int], int]:
        """A conversation -> ``(input_ids, labels, image parts)``, one image token per image part."""
        parts = sum(1 for m in messages for c in m["content"] if c.get("type") == "image")
        if prompt_only:
            while messages and messages[-1].get("role") == "assistant":
                messages = messages[:-1]
        segments = self._segments(messages, row_id, prompt_only)
        ids: list[int] = []
        labels: list[int] = []
        for text, is_response in segments:
            piece = self.tokenizer(text, add_special_tokens=False)["input_ids"] if text else []
            ids += piece
            if is_response:
                end = piece.index(self.eos_token_id) + 1 if self.eos_token_id in piece else len(piece)
                labels += piece[:end] + [IGNORE_INDEX] * (len(piece) - end)
            else:
                labels += [IGNORE_INDEX] * len(piece)
        return ids, labels, parts

    def _render(self, messages: list[dict], generation_prompt: bool, row_id) -> str:
        try:
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
        except Exception as exc:  # jinja errors on malformed messages
            raise RowError(
                f"row {row_id}: the chat template cannot render its messages ({exc}); fix the messages field."
            ) from exc

    def _segments(self, messages: list[dict], row_id, prompt_only: bool = False) -> list[tuple[str, bool]]:
        """Split a conversation into (text, is_assistant_response) pieces, as inference will see it.

        Assistant turn ``i`` is trained as it is generated: after the template's generation prompt
        for ``messages[:i]``, the response is the turn's text as the template renders it, through its
        end-of-turn token. Templates whose rendered assistant header differs from their generation
        prompt (llava-hf's LLaVA-OneVision: ``assistant \\n`` vs ``assistant\\n``) are trained on the
        generation prompt, so a served model sees exactly the prefix it learned after; earlier turns of
        a ``prompt_only`` conversation are written the same way, which then ends with the generation
        prompt. Where a response's text starts is found by rendering the turn with a sentinel in place
        of its text.
        """
        full = self._render(messages, False, row_id)
        segments, cursor = [], 0
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            before = self._render(messages[:i], False, row_id) if i else ""
            prompt = self._render(messages[:i], True, row_id)
            through = self._render(messages[: i + 1], False, row_id)
            probe = self._render(
                messages[:i] + [{"role": "assistant", "content": [{"type": "text", "text": _SENTINEL}]}], False, row_id
            )
            header = probe[: probe.find(_SENTINEL)]
            if _SENTINEL not in probe or not (
                full.startswith(through)
                and through.startswith(header)
                and header.startswith(before)
                and prompt.startswith(before)
                and before.startswith(full[:cursor])
            ):
                raise RowError(
                    f"row {row_id}: the chat template does not render turn {i} as a prefix of the conversation "
                    "with its text verbatim, so labels cannot be placed; use a prefix-consistent template."
                )
            segments += [(full[cursor : len(before)], False), (prompt[len(before) :], False), (through[len(header) :], True)]
            cursor = len(through)
        if prompt_only:
            prompt = self._render(messages, True, row_id)
            if not prompt.startswith(full):
                raise RowError(
                    f"row {row_id}: the chat template's generation prompt does not extend the conversation; use a prefix-consistent template."
                )
            return segments + [(prompt[cursor:], False)]
        if not segments:
            raise RowError(
                f"row {row_id}: messages have no assistant turn to learn from; add one or collate with prompt_only=True."
            )
        segments.append((full[cursor:], False))
        return segments

    def _expand_images(self, ids: list[int], labels: list[int], processed: list[dict], row_id) -> tuple[list[int], list[int]]:
        slots = [i for i, t in enumerate(ids) if t == self.image_token_id]
        if len(slots) != len(processed):
            raise RowError(
                f"row {row_id}: the rendered text has {len(slots)} image tokens for {len(processed)} images; remove literal image tokens from its text."
            )
        out_ids, out_labels, start = [], [], 0
        for slot, image in zip(slots, processed):
            count = self.spec.count_image_tokens(self.image_processor, image)
            out_ids += ids[start:slot] + [self.image_token_id] * count
            out_labels += labels[start:slot] + [IGNORE_INDEX] * count
            start = slot + 1
        return out_ids + ids[start:], out_labels + labels[start:]

    def _filler(self) -> tuple[dict[str, Tensor], int]:
        """The blank image a ``vision_filler`` batch carries: ``(processed image, placeholder tokens)``."""
        image = self.spec.process_image(self.image_processor, Image.new("RGB", (FILLER_SIZE, FILLER_SIZE), (255, 255, 255)))
        return image, self.spec.count_image_tokens(self.image_processor, image)

    def _truncate(self, ids: list[int], labels: list[int], prompt_only: bool, row_id) -> tuple[list[int], list[int]]:
        cut = self.max_length
        if prompt_only or length_verdict(ids, labels, cut, self.image_token_id) == REFUSED:
            what = "its prompt" if prompt_only else "its image tokens"
            raise RowError(
                f"row {row_id}: {len(ids)} tokens exceed max_length={cut} and truncating would cut {what}; raise max_length."
            )
        return ids[:cut], labels[:cut]

    def _process(self, data: bytes, row_id) -> dict[str, Tensor]:
        """Image bytes -> the family's per-image tensors, through an LRU cache keyed by content."""
        key = hashlib.blake2b(data, digest_size=16).digest()
        hit = self._cache.get(key)
        if hit is not None:
            self._cache.move_to_end(key)
            return hit

        try:
            image = Image.open(io.BytesIO(data)).convert("RGB")
        except Exception as exc:
            raise RowError(f"row {row_id}: its image bytes are not a readable image ({exc}); regenerate the row.") from exc
        out = self.spec.process_image(self.image_processor, image)
        if self.cache_size > 0:
            self._cache[key] = out
            if len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return out


def length_verdict(ids: Sequence[int], labels: Sequence[int], max_length: int | None, image_token_id: int) -> str:
    """What ``max_length`` does to a row of ``ids`` / ``labels`` (image placeholders expanded): :data:`FITS`,
    :data:`ANSWER_CUT`, :data:`NO_ANSWER` (every response token is past the cut) or :data:`REFUSED`
    (image tokens past the cut: the collator raises :class:`RowError`, a bad row)."""
    if max_length is None or len(ids) <= max_length:
        return FITS
    if image_token_id in ids[max_length:]:
        return REFUSED
    return ANSWER_CUT if any(label != IGNORE_INDEX for label in labels[:max_length]) else NO_ANSWER


def _as_rows(rows) -> list[dict]:
    if isinstance(rows, dict):  # columns, e.g. from Ray Data's iter_batches
        names = list(rows)
        return [dict(zip(names, values)) for values in zip(*(rows[n] for n in names))]
    return list(rows)


def _messages(row: dict, row_id) -> list[dict]:
    """The row's conversation with every ``content`` as a list of parts (``{"type": "text", ...}``,
    ``{"type": "image"}``): templates that iterate parts (LLaVA-OneVision's) drop plain-string content."""
    raw = row.get("messages")
    if isinstance(raw, (bytes, bytearray)):
        raw = raw.decode()
    try:
        messages = json.loads(raw) if isinstance(raw, str) else raw
    except json.JSONDecodeError as exc:
        raise RowError(f"row {row_id}: messages is not valid JSON ({exc.msg}); store the chat as a JSON list.") from exc
    if not isinstance(messages, list) or not all(isinstance(m, dict) and "role" in m for m in messages):
        raise RowError(f"row {row_id}: messages must be a list of {{'role', 'content'}} dicts; fix the row.")
    out = []
    for m in messages:
        content = m.get("content")
        if isinstance(content, str):
            content = [{"type": "text", "text": content}]
        elif not (isinstance(content, list) and all(isinstance(c, dict) and "type" in c for c in content)):
            raise RowError(
                f"row {row_id}: a {m['role']} message's content must be a string or a list of typed parts; fix the row."
            )
        out.append({**m, "content": content})
    return out


def _image_bytes(row: dict) -> list[bytes]:
    """The row's images as bytes (a list; Ray Data hands a numpy array of them; None: no image)."""
    images = row.get("images")
    if images is None:
        return []
    if isinstance(images, (bytes, bytearray, memoryview)):
        raise RowError(f"row {row.get('id')}: 'images' must be a list of encoded images, not one bytes value; wrap it in a list.")
    return [bytes(x) for x in images]
