"""ShareGPT / OpenAI-style records: ``{"id", "messages": [{"role", "content"}], "images": ["a.png", ...] (optional)}``.

``content`` is a string or a list of parts: ``{"type": "text", "text"}``, ``{"type": "image"}`` (the next
file of ``images``), ``{"type": "image", "image": "a.png"}``, or ``{"type": "image_url", "image_url":
{"url": "data:image/png;base64,..." | "a.png"}}``. A string may carry ``<image>`` placeholders for the
``images`` list. Text-only records (MathInstruct, MathPlus) have no images at all. Files: a JSON list or
JSON Lines (a directory: every ``*.json``/``*.jsonl`` in it); image paths are relative to ``image_root``.
"""

from __future__ import annotations

import base64
import binascii

from vlsi_ray.data.formats import (
    BadRecord,
    Format,
    Source,
    image_bytes,
    image_file,
    json_files,
    make_row,
    read_json_records,
    text_parts,
)

ROLES = ("system", "user", "assistant")


def _image(source: Source, part: dict, listed: list[str]) -> bytes:
    """The bytes of one image part: inline (``image_url`` data URI), named in the part, or the next listed
    file (taken off ``listed``)."""
    url = (part.get("image_url") or {}).get("url") if part.get("type") == "image_url" else None
    if isinstance(url, str) and url.startswith("data:"):
        try:
            return image_bytes(base64.b64decode(url.split(",", 1)[1], validate=True), "an inline image")
        except (binascii.Error, IndexError):
            raise BadRecord("an image_url data URI is not base64") from None
    name = url or part.get("image")
    if name is None:
        if not listed:
            raise BadRecord("more image parts than files in 'images'")
        name = listed.pop(0)
    return image_file(source, name)


def convert(source: Source, record: dict, number: int) -> dict:
    """One ShareGPT/OpenAI record -> a schema row (images in the order of their parts)."""
    if "__error__" in record:
        raise BadRecord(record["__error__"])
    turns = record.get("messages")
    if not isinstance(turns, list) or not turns:
        raise BadRecord("no 'messages' list")
    listed = record.get("images") or []
    listed = [listed] if isinstance(listed, str) else list(listed)
    total = len(listed)
    messages, images = [], []
    for turn in turns:
        role, content = (turn.get("role"), turn.get("content")) if isinstance(turn, dict) else (None, None)
        if role not in ROLES:
            raise BadRecord(f"a turn has role {role!r}; use system, user or assistant")
        if isinstance(content, str):
            content = text_parts(content)  # <image> placeholders take the listed files in order
        if not (isinstance(content, list) and all(isinstance(p, dict) for p in content)):
            raise BadRecord("a turn's content is neither a string nor a list of parts")
        parts = []
        for part in content:
            if part.get("type") == "text" and isinstance(part.get("text"), str):
                parts.append({"type": "text", "text": part["text"]})
            elif part.get("type") in ("image", "image_url"):
                images.append(_image(source, part, listed))
                parts.append({"type": "image"})
            else:
                raise BadRecord(f"a content part of type {part.get('type')!r} is neither text nor an image")
        messages.append({"role": role, "content": parts})
    if listed:
        raise BadRecord(f"{len(images)} image parts for {total} images")
    return make_row(source, number, messages, images)


FORMAT = Format(files=json_files, records=lambda source, path: read_json_records(path), convert=convert)
