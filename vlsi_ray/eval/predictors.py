"""Who answers the questions: a local checkpoint (batched :class:`ChatGenerator`) or a served endpoint.

Both implement :class:`Predictor`: ``predict(items) -> texts`` in order, greedy decoding, at most
``max_tokens`` new tokens. The harness calls ``predict`` on chunks of ``chunk_size`` items and saves
each chunk's answers before asking for the next, so an interrupted evaluation resumes where it stopped.
"""

from __future__ import annotations

import base64
import json
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Protocol

import requests

from vlsi_ray.eval.benchmarks import Item, image_mime
from vlsi_ray.generation import ChatGenerator, SamplingParams

#: HTTP statuses worth retrying (overload and gateway errors); every other 4xx/5xx fails at once.
RETRY_STATUSES = (429, 502, 503, 504)


class Predictor(Protocol):
    """Answers items; ``name`` identifies the model in results and in saved partial predictions."""

    name: str
    chunk_size: int

    def predict(self, items: Sequence[Item]) -> list[str]:
        """One answer text per item, in order."""
        ...


def chat_row(item: Item) -> dict:
    """The item as a chat row of the project's format: one user turn with its images, then its prompt."""
    content = [{"type": "image"} for _ in item.images] + [{"type": "text", "text": item.prompt}]
    return {"id": item.index, "messages": json.dumps([{"role": "user", "content": content}]), "images": list(item.images)}


class LocalPredictor:
    """Greedy answers from a local checkpoint, ``batch_size`` rows per ``generate`` call."""

    def __init__(self, model_dir: str | Path, batch_size: int = 8, max_tokens: int = 32, device: str = "cpu", generator=None):
        self.name = str(model_dir)
        self.generator = generator or ChatGenerator.from_pretrained(model_dir, device=device)
        self.params = SamplingParams(max_tokens=max_tokens)
        self.chunk_size = batch_size

    def predict(self, items: Sequence[Item]) -> list[str]:
        """Decode ``items`` in one batched call (the harness passes at most ``batch_size``)."""
        return [c.text for c in self.generator.generate([chat_row(it) for it in items], self.params)]


class EndpointError(RuntimeError):
    """The endpoint refused a request or cannot be reached; the message says what to check."""


class EndpointPredictor:
    """Greedy answers from an OpenAI-compatible ``/v1/chat/completions`` endpoint, ``workers`` requests at a time.

    Connection errors, timeouts and statuses in :data:`RETRY_STATUSES` are retried ``retries`` times
    with exponential back-off; any other error status raises :class:`EndpointError` naming it.
    """

    def __init__(
        self,
        base_url: str,
        model_name: str | None = None,
        api_key: str | None = None,
        workers: int = 4,
        max_tokens: int = 32,
        timeout: float = 120.0,
        retries: int = 4,
        backoff: float = 0.5,
    ):
        self.base_url = base_url.rstrip("/").removesuffix("/v1")
        self.api_key = api_key
        self.workers = workers
        self.chunk_size = 4 * workers
        self.max_tokens = max_tokens
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff
        self._local = threading.local()
        self._requests = requests
        served = self.models()
        if model_name is None:
            model_name = served[0]
        elif model_name not in served:
            raise EndpointError(
                f"{self.base_url} does not serve model {model_name!r} (it serves {served}); pass one of those as --model-name."
            )
        self.model_name = model_name
        self.name = f"{self.base_url} ({model_name})"

    def models(self) -> list[str]:
        """Model ids listed by ``GET /v1/models``."""
        data = self._call("GET", "/v1/models")
        ids = [m.get("id") for m in data.get("data", []) if isinstance(m, dict)]
        if not ids:
            raise EndpointError(f"{self.base_url}/v1/models lists no models; check that the URL points to the served app.")
        return ids

    def request_body(self, item: Item) -> dict:
        """The chat-completions JSON for one item: images as base64 data URIs, then the prompt."""
        content = [
            {"type": "image_url", "image_url": {"url": f"data:{image_mime(data)};base64,{base64.b64encode(data).decode()}"}}
            for data in item.images
        ]
        content.append({"type": "text", "text": item.prompt})
        return {
            "model": self.model_name,
            "messages": [{"role": "user", "content": content}],
            "max_tokens": self.max_tokens,
            "temperature": 0,
        }

    def predict(self, items: Sequence[Item]) -> list[str]:
        """Send ``items`` concurrently (``workers`` threads); answers come back in order."""
        with ThreadPoolExecutor(max_workers=self.workers) as pool:
            return list(pool.map(self._answer, items))

    def _answer(self, item: Item) -> str:
        data = self._call("POST", "/v1/chat/completions", self.request_body(item))
        try:
            return data["choices"][0]["message"]["content"] or ""
        except (KeyError, IndexError, TypeError) as exc:
            raise EndpointError(
                f"{self.base_url} answered item {item.index} without choices[0].message.content "
                f"({str(data)[:200]}); is it an OpenAI-compatible endpoint?"
            ) from exc

    def _session(self):
        if not hasattr(self._local, "session"):
            self._local.session = self._requests.Session()
        return self._local.session

    def _call(self, method: str, route: str, body: dict | None = None) -> dict:
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        url = self.base_url + route
        for attempt in range(self.retries + 1):
            last = attempt == self.retries
            try:
                response = self._session().request(method, url, json=body, headers=headers, timeout=self.timeout)
            except (self._requests.ConnectionError, self._requests.Timeout) as exc:
                if last:
                    raise EndpointError(
                        f"cannot reach {url} after {self.retries + 1} tries ({type(exc).__name__}); "
                        "check that the server is running and the URL is right."
                    ) from exc
            else:
                if response.status_code < 400:
                    try:
                        return response.json()
                    except ValueError as exc:
                        raise EndpointError(
                            f"{method} {url} answered {response.status_code} with a body that is not JSON; "
                            "is it an OpenAI-compatible endpoint?"
                        ) from exc
                if response.status_code not in RETRY_STATUSES or last:
                    hint = " (set the API key with --api-key-env VAR)" if response.status_code in (401, 403) else ""
                    raise EndpointError(f"{method} {url} answered {response.status_code}: {_error_message(response)}{hint}.")
            time.sleep(self.backoff * 2**attempt)
        raise AssertionError("unreachable")


def _error_message(response) -> str:
    try:
        error = response.json().get("error", {})
        return error.get("message", str(error)) if isinstance(error, dict) else str(error)
    except ValueError:
        return response.text[:200] or response.reason
