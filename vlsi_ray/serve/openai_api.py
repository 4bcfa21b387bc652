"""The OpenAI chat-completions wire format: request validation and response bodies (no Ray, no HTTP).

A request body becomes a :class:`ChatRequest`: a chat row in the project's format (HF chat messages
with ``{"type": "image"}`` parts plus the image bytes, exactly what training collated) and its
:class:`~vlsi_ray.generation.SamplingParams`. Every problem raises :class:`APIError` with the HTTP
status and an OpenAI-style error body that names the offending field.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import time
import uuid
from dataclasses import dataclass
from typing import Any

from PIL import Image

from vlsi_ray.generation import Completion, SamplingParams
from vlsi_ray.serve.config import Limits

ROLES = ("system", "user", "assistant")


class APIError(Exception):
    """An error answered as ``{"error": {"message", "type", "param", "code"}}`` with ``status``."""

    def __init__(
        self, status: int, message: str, param: str | None = None, code: str | None = None, type: str = "invalid_request_error"
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclass
class ChatRequest:
    """A validated request: the chat ``row`` to generate for, how to decode it, how to answer."""

    row: dict
    params: SamplingParams
    stream: bool
    include_usage: bool


def parse_body(raw: bytes, limits: Limits) -> dict:
    """Request bytes -> JSON object; 413 when too large, 400 when not a JSON object."""
    if len(raw) > limits.max_body_bytes:
        raise APIError(
            413,
            f"request body is {len(raw)} bytes, over the limit of {limits.max_body_bytes}; send smaller images.",
            code="body_too_large",
        )
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise APIError(400, f"request body is not valid JSON ({exc}); send a JSON object.", code="invalid_json") from None
    if not isinstance(body, dict):
        raise APIError(400, "request body must be a JSON object with 'model' and 'messages'.", code="invalid_json")
    return body


def parse_chat_request(body: dict, model_name: str, limits: Limits, default_max_tokens: int) -> ChatRequest:
    """Validate a ``/v1/chat/completions`` body; raise :class:`APIError` (400/404) naming the field."""
    model = body.get("model")
    if not isinstance(model, str):
        raise APIError(400, "'model' must be a string naming the served model.", "model")
    if model != model_name:
        raise APIError(404, f"model {model!r} does not exist; this server serves {model_name!r}.", "model", "model_not_found")
    n = _typed(body, "n", int, 1)
    if n != 1:
        raise APIError(400, f"'n' must be 1 (got {n}); send separate requests for more choices.", "n")
    max_tokens = _typed(body, "max_completion_tokens", int, None)
    max_tokens = _typed(body, "max_tokens", int, max_tokens if max_tokens is not None else default_max_tokens)
    if not 1 <= max_tokens <= limits.max_tokens:
        raise APIError(400, f"'max_tokens' must be between 1 and {limits.max_tokens}, got {max_tokens}.", "max_tokens")
    temperature = float(_typed(body, "temperature", (int, float), 0.0))
    if not 0.0 <= temperature <= 2.0:
        raise APIError(400, f"'temperature' must be between 0 and 2, got {temperature}.", "temperature")
    top_p = float(_typed(body, "top_p", (int, float), 1.0))
    if not 0.0 < top_p <= 1.0:
        raise APIError(400, f"'top_p' must be in (0, 1], got {top_p}.", "top_p")
    seed = _typed(body, "seed", int, None)
    stop = body.get("stop")
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) and s for s in stop):
        raise APIError(400, "'stop' must be a non-empty string or a list of up to 4 non-empty strings.", "stop")
    stream = _typed(body, "stream", bool, False)
    options = _typed(body, "stream_options", dict, {}) or {}
    include_usage = bool(options.get("include_usage", False))
    messages, images = _messages(body.get("messages"), limits)
    params = SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p, stop=tuple(stop), seed=seed)
    row = {"id": f"chatcmpl-{uuid.uuid4().hex[:24]}", "messages": messages, "images": images}
    return ChatRequest(row, params, stream, include_usage)


def _typed(body: dict, key: str, kind, default):
    value = body.get(key)
    if value is None:
        return default
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
        names = " or ".join(
            "number" if k is float else {int: "integer", bool: "boolean", dict: "object"}.get(k, k.__name__) for k in kinds
        )
        raise APIError(400, f"'{key}' must be a {names}, got {json.dumps(value)[:40]}.", key)
    return value


def _messages(messages: Any, limits: Limits) -> tuple[list[dict], list[bytes]]:
    """OpenAI messages -> (HF chat messages with image placeholders, image bytes in order)."""
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "'messages' must be a non-empty list of {role, content} objects.", "messages")
    if len(messages) > limits.max_messages:
        raise APIError(400, f"'messages' has {len(messages)} entries, over the limit of {limits.max_messages}.", "messages")
    out: list[dict] = []
    images: list[bytes] = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            raise APIError(400, f"{where} must be an object whose 'role' is one of {', '.join(ROLES)}.", where)
        content = message.get("content")
        if isinstance(content, str):
            parts = [{"type": "text", "text": content}]
        elif isinstance(content, list) and content:
            parts = [_part(part, f"{where}.content[{j}]", images, limits) for j, part in enumerate(content)]
        else:
            raise APIError(400, f"{where}.content must be a string or a non-empty list of content parts.", f"{where}.content")
        if message["role"] != "user" and any(p["type"] == "image" for p in parts):
            raise APIError(400, f"{where} has an image, but only user messages may carry images.", f"{where}.content")
        out.append({"role": message["role"], "content": parts})
    if out[-1]["role"] == "assistant":
        raise APIError(400, "the last message is the assistant's; end with a user message to get a reply.", "messages")
    return out, images


def _part(part: Any, where: str, images: list[bytes], limits: Limits) -> dict:
    kind = part.get("type") if isinstance(part, dict) else None
    if kind == "text":
        if not isinstance(part.get("text"), str):
            raise APIError(400, f"{where}.text must be a string.", f"{where}.text")
        return {"type": "text", "text": part["text"]}
    if kind == "image_url":
        url = part.get("image_url")
        url = url.get("url") if isinstance(url, dict) else url
        if not isinstance(url, str):
            raise APIError(400, f"{where}.image_url.url must be a string (a data URI or base64).", f"{where}.image_url")
        if len(images) >= limits.max_images:
            raise APIError(400, f"a request may carry at most {limits.max_images} images.", where, "too_many_images")
        images.append(decode_image(url, f"{where}.image_url", limits))
        return {"type": "image"}
    raise APIError(400, f"{where} has type {kind!r}; use 'text' or 'image_url'.", f"{where}.type")


def decode_image(url: str, where: str, limits: Limits) -> bytes:
    """A ``data:image/...;base64,`` URI (or bare base64) -> image bytes, checked to be a readable image."""
    if url.startswith(("http://", "https://")):
        raise APIError(
            400,
            f"{where} is a remote URL; this server does not fetch URLs, send the image as a base64 data URI.",
            where,
            "remote_image_url",
        )
    payload = url.split(",", 1)[1] if url.startswith("data:") and "," in url else url
    if url.startswith("data:") and ";base64," not in url[:100]:
        raise APIError(400, f"{where} is a data URI without ';base64,'; encode the image as base64.", where, "invalid_base64")
    if len(payload) * 3 // 4 > limits.max_image_bytes:
        raise APIError(400, f"{where} is over the image size limit of {limits.max_image_bytes} bytes.", where, "image_too_large")
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise APIError(
            400, f"{where} is not valid base64; send a data URI such as data:image/png;base64,iVBOR....", where, "invalid_base64"
        ) from None
    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
            if width * height > limits.max_image_pixels:
                raise APIError(
                    400,
                    f"{where} is {width}x{height} pixels, over the limit of {limits.max_image_pixels}; downscale it.",
                    where,
                    "image_too_large",
                )
            image.verify()
    except APIError:
        raise
    except Exception:
        raise APIError(
            400, f"{where} does not decode as an image (PNG, JPEG, ...); send image bytes.", where, "invalid_image"
        ) from None
    return data


# ----- responses ---------------------------------------------------------------------------------
def usage(c: Completion) -> dict:
    return {
        "prompt_tokens": c.prompt_tokens,
        "completion_tokens": c.completion_tokens,
        "total_tokens": c.prompt_tokens + c.completion_tokens,
    }


def completion_body(request_id: str, model: str, c: Completion) -> dict:
    """The ``chat.completion`` object of a finished request."""
    return {
        "id": request_id,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": c.text}, "finish_reason": c.finish_reason, "logprobs": None}
        ],
        "usage": usage(c),
    }


def chunk_body(request_id: str, model: str, delta: dict, finish_reason: str | None = None, usage_: dict | None = None) -> dict:
    """One ``chat.completion.chunk`` of a stream (``choices`` is empty in the usage-only chunk)."""
    choices = [] if usage_ is not None else [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}]
    body = {"id": request_id, "object": "chat.completion.chunk", "created": int(time.time()), "model": model, "choices": choices}
    if usage_ is not None:
        body["usage"] = usage_
    return body


def sse(body: dict | str) -> str:
    """A server-sent event line pair: ``data: <json>\\n\\n`` (or ``data: [DONE]``)."""
    return f"data: {body if isinstance(body, str) else json.dumps(body)}\n\n"
