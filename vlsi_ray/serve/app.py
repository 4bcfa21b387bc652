"""The Ray Serve app: an OpenAI-compatible chat-completions endpoint for an exported VLsI student.

Routes: ``POST /v1/chat/completions`` (text + ``image_url`` parts as base64 data URIs; ``stream``
as server-sent events), ``GET /v1/models``, ``GET /health``. Concurrent requests are decoded
together: ``@serve.batch`` collects up to ``max_batch_size`` of them and one batched ``generate``
call streams every request's text back through an async generator, so streamed and non-streamed
requests share batches. Requests are validated one by one before they join a batch, so a bad
request gets its own 4xx and never fails its batch-mates.

``serve run conf/serve.yaml`` or ``python jobs/serve.py`` deploy it; the builder is
:func:`build_app` (``import_path: vlsi_ray.serve.app:build_app``).

No ``from __future__ import annotations`` here: in the methods Serve wraps, FastAPI must see
``Request`` as a class (not a string) or it takes ``request`` for a query parameter.
"""

import asyncio
import hmac
import logging
import os
from collections.abc import AsyncGenerator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from vlsi_ray.data.collate import RowError
from vlsi_ray.env import set_offline_defaults
from vlsi_ray.generation import ChatGenerator, Completion
from vlsi_ray.prepare import resolve_device
from vlsi_ray.serve.config import ServeConfig, serve_config
from vlsi_ray.serve.openai_api import (
    APIError,
    ChatRequest,
    chunk_body,
    completion_body,
    parse_body,
    parse_chat_request,
    sse,
    usage,
)

logger = logging.getLogger("ray.serve")
api = FastAPI(title="vlsi-ray", description="OpenAI-compatible chat completions for a VLsI-distilled VLM")


@api.exception_handler(APIError)
async def _api_error(request: Request, exc: APIError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status)


@api.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    message = f"{request.method} {request.url.path}: {exc.detail}; see GET /v1/models, POST /v1/chat/completions, GET /health."
    return JSONResponse(
        APIError(exc.status_code, message, code="not_found" if exc.status_code == 404 else None).body(),
        status_code=exc.status_code,
    )


@api.exception_handler(Exception)
async def _server_error(request: Request, exc: Exception) -> JSONResponse:
    logger.exception("request %s %s failed", request.method, request.url.path)
    return JSONResponse(
        APIError(
            500,
            f"the server failed on this request ({type(exc).__name__}); retry, and report it if it persists.",
            type="server_error",
        ).body(),
        status_code=500,
    )


#: Response header of a non-streamed completion: how many requests its decode served together.
BATCH_HEADER = "X-VLSI-Batch-Size"


@serve.deployment(name="ChatModel")
@serve.ingress(api)
class ChatModel:
    """One replica: the exported model on this replica's device, behind the OpenAI routes."""

    def __init__(self, config: dict[str, Any]):
        set_offline_defaults()
        self.cfg: ServeConfig = serve_config(config)
        self.name = self.cfg.served_name
        self.generator = ChatGenerator.from_pretrained(self.cfg.model_dir, resolve_device(self.cfg.device), self.cfg.dtype)
        self.max_context = getattr(self.generator.backbone.base_model.config.get_text_config(), "max_position_embeddings", None)
        key = os.environ.get(self.cfg.api_key_env or "", "")
        self.api_key = key or None
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="generate")
        self._batched.set_max_batch_size(self.cfg.max_batch_size)
        self._batched.set_batch_wait_timeout_s(self.cfg.batch_wait_timeout_s)
        logger.info(
            "serving %s from %s on %s (batch %d, key %s)",
            self.name,
            self.cfg.model_dir,
            self.generator.backbone.device,
            self.cfg.max_batch_size,
            "required" if self.api_key else "off",
        )

    # ----- routes -------------------------------------------------------------------------------
    @api.get("/health")
    def health(self) -> dict:
        return {"status": "ok", "model": self.name}

    @api.get("/v1/models")
    def models(self, request: Request) -> dict:
        self._authorize(request)
        return {"object": "list", "data": [{"id": self.name, "object": "model", "created": 0, "owned_by": "vlsi-ray"}]}

    @api.post("/v1/chat/completions")
    async def chat_completions(self, request: Request):
        self._authorize(request)
        length = request.headers.get("content-length")
        if length and length.isdigit() and int(length) > self.cfg.limits.max_body_bytes:
            raise APIError(
                413,
                f"request body is {length} bytes, over the limit of {self.cfg.limits.max_body_bytes}; send smaller images.",
                code="body_too_large",
            )
        body = parse_body(await request.body(), self.cfg.limits)
        chat = parse_chat_request(body, self.name, self.cfg.limits, self.cfg.default_max_tokens)
        self._check_prompt(chat)
        events = self._batched(chat)
        if chat.stream:
            return StreamingResponse(self._sse(chat, events), media_type="text/event-stream")
        result = None
        async for event in events:  # to the end, so that Serve's last future is consumed too
            if isinstance(event, Completion):
                result = event
        if result is None:
            raise APIError(500, "generation ended without a result; retry the request.", type="server_error")
        # How many requests this one was decoded with (dynamic batching at work), for clients and tests.
        return JSONResponse(completion_body(chat.row["id"], self.name, result), headers={BATCH_HEADER: str(result.batch_size)})

    # ----- helpers ------------------------------------------------------------------------------
    def _authorize(self, request: Request) -> None:
        if self.api_key is None:
            return
        header = request.headers.get("authorization", "")
        token = header[7:] if header.lower().startswith("bearer ") else ""
        if not hmac.compare_digest(token.encode(), self.api_key.encode()):
            raise APIError(
                401,
                "missing or wrong API key; send 'Authorization: Bearer <key>'.",
                code="invalid_api_key",
                type="authentication_error",
            )

    def _check_prompt(self, chat: ChatRequest) -> None:
        """Collate the prompt alone first, so a bad one fails here with a 400 and not inside a batch."""
        try:
            tokens = self.generator.prompt_tokens(chat.row)
        except RowError as exc:
            raise APIError(400, str(exc).replace(f"row {chat.row['id']}: ", "the request: "), "messages") from None
        if self.max_context and tokens + chat.params.max_tokens > self.max_context:
            raise APIError(
                400,
                f"the prompt ({tokens} tokens) plus max_tokens ({chat.params.max_tokens}) exceeds the model's context of {self.max_context}; shorten it.",
                "messages",
                "context_length_exceeded",
            )

    async def _sse(self, chat: ChatRequest, events: AsyncGenerator) -> AsyncGenerator[str, None]:
        rid = chat.row["id"]
        yield sse(chunk_body(rid, self.name, {"role": "assistant", "content": ""}))
        async for event in events:
            if isinstance(event, Completion):
                if chat.include_usage:
                    yield sse(chunk_body(rid, self.name, {}, usage_=usage(event)))
            elif event is not None:
                text, finish = event
                yield sse(chunk_body(rid, self.name, {"content": text} if text else {}, finish))
        yield sse("[DONE]")

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01)
    async def _batched(self, chats: list[ChatRequest]) -> AsyncGenerator[list, None]:
        """Decode ``chats`` together; yields per step one item per request.

        Items: ``(new_text, finish_reason)`` while generating, ``None`` when a request has nothing
        new, and finally each request's :class:`Completion`.
        """
        loop = asyncio.get_running_loop()
        steps: asyncio.Queue = asyncio.Queue()
        rows, params = [c.row for c in chats], [c.params for c in chats]
        work = loop.run_in_executor(
            self.executor,
            lambda: self.generator.generate(
                rows, params, on_step=lambda deltas: loop.call_soon_threadsafe(steps.put_nowait, deltas)
            ),
        )
        while True:
            get = asyncio.ensure_future(steps.get())
            await asyncio.wait({get, work}, return_when=asyncio.FIRST_COMPLETED)
            if not get.done():
                get.cancel()
                break
            yield get.result()
        while not steps.empty():
            yield steps.get_nowait()
        yield await work  # raises the generation error, if any, into every request of the batch


def build_app(args: dict[str, Any]) -> serve.Application:
    """Serve application builder (``import_path: vlsi_ray.serve.app:build_app``); ``args`` as :class:`ServeConfig`."""
    args = dict(args)
    if Path(args.get("model_dir", "")).is_dir():  # relative to where the app is built, not to the replica's cwd
        args["model_dir"] = str(Path(args["model_dir"]).resolve())
    cfg = serve_config(args)
    scale = cfg.autoscaling
    deployment = ChatModel.options(
        autoscaling_config={
            "min_replicas": scale.min_replicas,
            "max_replicas": scale.max_replicas,
            "target_ongoing_requests": scale.target_ongoing_requests,
        },
        max_ongoing_requests=cfg.max_ongoing_requests,
        ray_actor_options={"num_cpus": cfg.num_cpus, "num_gpus": cfg.num_gpus},
        health_check_period_s=10,
    )
    return deployment.bind(args)
