"""LLaVA / ShareGPT4V-style records: ``{"id", "image": "a.jpg" | ["a.jpg", "b.jpg"] (optional),
"conversations": [{"from": "human" | "gpt" | "system", "value": "<image>\\nWhat is it?"}, ...]}``.

Files: a JSON list or JSON Lines (a directory: every ``*.json``/``*.jsonl`` in it). Each ``<image>`` in a
turn's text becomes an image part where it stands; image paths are relative to the source's
``image_root``. A record with images but no placeholder gets them at the start of its first human
turn (LLaVA's own convention); a placeholder count that differs from the image count is a bad
record, as are a missing or unreadable image file and a conversation without a ``gpt`` turn.
"""

from __future__ import annotations

from vlsi_ray.data.formats import (
    BadRecord,
    Format,
    Source,
    count_images,
    image_file,
    images_first,
    json_files,
    make_row,
    read_json_records,
    text_parts,
)

ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


def convert(source: Source, record: dict, number: int) -> dict:
    """One LLaVA record -> a schema row (images read from ``image_root``)."""
    if "__error__" in record:
        raise BadRecord(record["__error__"])
    turns = record.get("conversations")
    if not isinstance(turns, list) or not turns:
        raise BadRecord("no 'conversations' list")
    names = record.get("image") or []
    names = [names] if isinstance(names, str) else list(names)
    messages = []
    for turn in turns:
        role = ROLES.get(str(turn.get("from", "")).lower()) if isinstance(turn, dict) else None
        if role is None or not isinstance(turn.get("value"), str):
            raise BadRecord(f"turn {turn!r:.60} has no known 'from' (human, gpt, system) and text 'value'")
        messages.append({"role": role, "content": text_parts(turn["value"])})
    images_first(messages, len(names))
    if count_images(messages) != len(names):
        raise BadRecord(f"{count_images(messages)} <image> placeholders for {len(names)} images")
    images = [image_file(source, name) for name in names]
    return make_row(source, number, messages, images)


FORMAT = Format(files=json_files, records=lambda source, path: read_json_records(path), convert=convert)
