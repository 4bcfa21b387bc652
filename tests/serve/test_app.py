"""The Serve app over real HTTP on 127.0.0.1: the openai client, streaming, bad input, concurrency, API key."""

from __future__ import annotations

import base64
import io
import json
import socket
from concurrent.futures import ThreadPoolExecutor

import pytest
import ray
import requests
import torch
from openai import OpenAI
from PIL import Image
from ray import serve

from vlsi_ray.data.shards import read_rows
from vlsi_ray.eval.benchmarks import mcq_benchmark
from vlsi_ray.eval.predictors import EndpointError, EndpointPredictor, LocalPredictor
from vlsi_ray.generation import ChatGenerator, SamplingParams
from vlsi_ray.runners.ray.driver import ray_env
from vlsi_ray.serve.app import BATCH_HEADER, build_app

pytestmark = pytest.mark.integration
KEY = "test-key-123"
NAME = "vlsi-tiny"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


#: A second application, at /released: a LLaVA-OneVision checkpoint as released (bfloat16, llava-hf's template).
RELEASED = "llava-ov-released"


@pytest.fixture(scope="module")
def released(hub_worlds):
    return hub_worlds("llava_onevision")


@pytest.fixture(scope="module")
def server(exported, released):
    """``serve.run`` of the app for the exported tiny student, with an API key, and of a released-layout
    bfloat16 checkpoint at ``/released`` (no key); yields the base URL."""
    if ray.is_initialized():  # the integration tests' shared Ray: this app needs its own (the key in its env)
        ray.shutdown()
    ray.init(address="local", num_cpus=4, runtime_env={"env_vars": {**ray_env(), "VLSI_TEST_KEY": KEY}}, include_dashboard=False)
    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(
        build_app(
            {
                "model_dir": str(exported),
                "model_name": NAME,
                "api_key_env": "VLSI_TEST_KEY",
                "max_batch_size": 8,
                "default_max_tokens": 16,
                "limits": {"max_body_bytes": 200_000, "max_images": 2, "max_image_pixels": 512 * 512, "max_tokens": 32},
            }
        ),
        name="vlsi",
        route_prefix="/",
    )
    serve.run(
        build_app({"model_dir": str(released.student), "model_name": RELEASED, "api_key_env": None, "max_batch_size": 4}),
        name="released",
        route_prefix="/released",
    )
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()
    ray.shutdown()


@pytest.fixture(scope="module")
def client(server):
    return OpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def row(tiny_run):
    return read_rows(tiny_run.data, split="test")[0][0]


def _messages(row) -> list[dict]:
    question = next(p["text"] for p in json.loads(row["messages"])[0]["content"] if p["type"] == "text")
    url = "data:image/png;base64," + base64.b64encode(row["images"][0]).decode()
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": question}]}]


def test_models_and_health(client, server):
    assert [m.id for m in client.models.list().data] == [NAME]
    health = requests.get(f"{server}/health", timeout=30)
    assert health.status_code == 200 and health.json() == {"status": "ok", "model": NAME}


def test_openai_client_with_an_image_matches_the_local_model(client, row, exported):
    reply = client.chat.completions.create(model=NAME, messages=_messages(row), max_tokens=10)
    local_gen = ChatGenerator.from_pretrained(exported)
    local = local_gen.generate([row], SamplingParams(max_tokens=10))[0]
    assert reply.choices[0].message.content == local.text
    assert reply.choices[0].finish_reason == local.finish_reason
    assert reply.usage.prompt_tokens == local.prompt_tokens == local_gen.prompt_tokens(row)
    assert reply.usage.completion_tokens == local.completion_tokens


def test_a_released_bfloat16_checkpoint_is_served_as_is(server, released):
    """The Hub-layout LLaVA-OneVision student, straight from its directory: bfloat16 on the replica, the
    released chat template, the same greedy answer and token counts as the project's generation."""
    test_row = read_rows(released.data, split="test")[0][0]
    client = OpenAI(base_url=f"{server}/released/v1", api_key="none", max_retries=0, timeout=120)
    reply = client.chat.completions.create(model=RELEASED, messages=_messages(test_row), max_tokens=8)
    local_gen = ChatGenerator.from_pretrained(released.student)
    assert local_gen.backbone.compute_dtype == torch.bfloat16
    local = local_gen.generate([test_row], SamplingParams(max_tokens=8))[0]
    assert reply.choices[0].message.content == local.text
    assert reply.usage.prompt_tokens == local.prompt_tokens and reply.usage.completion_tokens == local.completion_tokens


def test_stream_concatenates_to_the_plain_reply(client, row):
    plain = client.chat.completions.create(model=NAME, messages=_messages(row), max_tokens=12)
    stream = client.chat.completions.create(
        model=NAME, messages=_messages(row), max_tokens=12, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == [
        plain.choices[0].finish_reason
    ]
    assert chunks[-1].usage.completion_tokens == plain.usage.completion_tokens


def _png_b64(size) -> str:
    buf = io.BytesIO()
    Image.new("RGB", size, "blue").save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def _body(**fields) -> dict:
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64," + _png_b64((56, 56))}}
    return {
        "model": NAME,
        "messages": [{"role": "user", "content": [image, {"type": "text", "text": "What colour?"}]}],
        "max_tokens": 2,
        **fields,
    }


AUTH = {"Authorization": f"Bearer {KEY}"}
BAD = {
    "malformed JSON": (400, b'{"model": "vlsi-tiny", "messages": [', AUTH),
    "bad base64": (
        400,
        _body(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,%%%"}}]}]),
        AUTH,
    ),
    "not an image": (
        400,
        _body(
            messages=[
                {
                    "role": "user",
                    "content": [
                        {
                            "type": "image_url",
                            "image_url": {"url": "data:image/png;base64," + base64.b64encode(b"GIF? no").decode()},
                        }
                    ],
                }
            ]
        ),
        AUTH,
    ),
    "too many pixels": (
        400,
        _body(
            messages=[
                {
                    "role": "user",
                    "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64," + _png_b64((600, 600))}}],
                }
            ]
        ),
        AUTH,
    ),
    "too many images": (
        400,
        _body(
            messages=[
                {
                    "role": "user",
                    "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64," + _png_b64((28, 28))}}] * 3,
                }
            ]
        ),
        AUTH,
    ),
    "wrong field type": (400, _body(max_tokens="ten"), AUTH),
    "max_tokens over the limit": (400, _body(max_tokens=1000), AUTH),
    "empty messages": (400, _body(messages=[]), AUTH),
    "unknown model": (404, _body(model="gpt-4o"), AUTH),
    "body too large": (413, _body(padding="x" * 300_000), AUTH),
    "no API key": (401, _body(), {}),
    "wrong API key": (401, _body(), {"Authorization": "Bearer nope"}),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_gets_a_4xx_and_the_server_keeps_serving(server, case):
    status, body, headers = BAD[case]
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    reply = requests.post(
        f"{server}/v1/chat/completions", data=data, headers={"Content-Type": "application/json", **headers}, timeout=60
    )
    assert reply.status_code == status, reply.text
    error = reply.json()["error"]
    assert error["message"] and error["type"]
    good = requests.post(f"{server}/v1/chat/completions", json=_body(), headers=AUTH, timeout=60)
    assert good.status_code == 200 and good.json()["choices"][0]["message"]["role"] == "assistant"


def test_unknown_route_and_key_on_models(server):
    missing = requests.get(f"{server}/v1/nothing", headers=AUTH, timeout=30)
    assert missing.status_code == 404 and "error" in missing.json()
    assert requests.get(f"{server}/v1/models", timeout=30).status_code == 401


def test_32_concurrent_requests_all_succeed_decoded_together(client, row):
    """32 concurrent requests: all answered, several decodes serve more than one request (the response header
    says how many, up to the app's max_batch_size of 8), and a seeded request's text does not depend on its batch."""

    def ask(i):
        raw = client.chat.completions.with_raw_response.create(
            model=NAME, messages=_messages(row), max_tokens=6, temperature=0.8, seed=i
        )
        return raw.parse(), int(raw.headers[BATCH_HEADER])

    with ThreadPoolExecutor(32) as pool:
        answers = list(pool.map(ask, range(32)))
    replies, batches = [a for a, _ in answers], [b for _, b in answers]
    assert len(replies) == 32 and all(r.choices[0].finish_reason in ("stop", "length") for r in replies)
    assert all(1 <= r.usage.completion_tokens <= 6 for r in replies)
    assert all(1 <= b <= 8 for b in batches) and max(batches) > 1, batches
    # Same seed, same text, whatever batch a request landed in.
    again, alone = ask(3)
    assert alone == 1 and again.choices[0].message.content == replies[3].choices[0].message.content


def test_eval_harness_scores_the_endpoint_like_the_local_model(server, exported, fixture_sets):
    items = mcq_benchmark(fixture_sets.mcq).items[:4]
    endpoint = EndpointPredictor(server, NAME, api_key=KEY, workers=4, max_tokens=4)
    local = LocalPredictor(exported, batch_size=1, max_tokens=4)
    assert endpoint.predict(items) == [local.predict([it])[0] for it in items]
    with pytest.raises(EndpointError, match="answered 401.*--api-key-env"):
        EndpointPredictor(server, NAME, api_key="wrong")
    with pytest.raises(EndpointError, match=r"does not serve model 'other'"):
        EndpointPredictor(server, "other", api_key=KEY)
