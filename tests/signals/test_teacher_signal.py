"""TeacherSignal: construction from logits, top-k + tail exactness, views, numpy codec and sizes."""

import numpy as np
import pytest
import torch

from vlsi_ray.signals import TeacherSignal, tail_logmass_from_topk


def _np_log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


@pytest.fixture
def logits() -> torch.Tensor:
    return torch.randn(3, 5, 50, generator=torch.Generator().manual_seed(0)) * 3


def test_dense_logprobs_match_numpy_reference_with_temperature(logits):
    sig = TeacherSignal.from_logits(logits, None, temperature=2.0)
    ref = _np_log_softmax(logits.double().numpy() / 2.0)
    assert sig.is_dense and sig.k is None
    assert (sig.num_layers, sig.num_tokens, sig.vocab_size, sig.temperature) == (3, 5, 50, 2.0)
    assert sig.logprobs.dtype == torch.float32
    np.testing.assert_allclose(sig.logprobs.numpy(), ref, atol=1e-5)


def test_topk_values_ids_and_tail_match_numpy_reference(logits):
    sig = TeacherSignal.from_logits(logits, 7)
    ref = _np_log_softmax(logits.double().numpy())
    order = np.argsort(-ref, axis=-1)[..., :7]
    assert sig.k == 7 and sig.topk_ids.dtype == torch.int64
    np.testing.assert_array_equal(sig.topk_ids.numpy(), order)
    np.testing.assert_allclose(sig.topk_logprobs.numpy(), np.take_along_axis(ref, order, -1), atol=1e-5)
    tail = np.log1p(-np.exp(np.take_along_axis(ref, order, -1)).sum(-1))
    np.testing.assert_allclose(sig.tail_logmass.numpy(), tail, atol=1e-5)
    # The top-k and tail probabilities are a distribution.
    total = sig.topk_logprobs.double().exp().sum(-1) + sig.tail_logmass.double().exp()
    np.testing.assert_allclose(total.numpy(), 1.0, atol=1e-6)


def test_k_at_least_vocab_keeps_everything_with_zero_tail(logits):
    sig = TeacherSignal.from_logits(logits, 10_000)
    assert sig.k == 50
    assert torch.isneginf(sig.tail_logmass).all()


def test_tail_stays_accurate_when_tiny():
    # Top-1 mass 1 - 1e-12: "1 - sum" in float32 would round to 0; the complement log-sum-exp does not.
    logits = torch.tensor([[[0.0, -12 * np.log(10.0)]]], dtype=torch.float64)
    sig = TeacherSignal.from_logits(logits, 1)
    assert sig.tail_logmass.item() == pytest.approx(np.log(1e-12), rel=1e-9)


def test_from_topk_tail_agrees_with_from_logits_and_clamps_at_zero(logits):
    exact = TeacherSignal.from_logits(logits.double(), 5)
    rebuilt = TeacherSignal.from_topk(exact.topk_logprobs, exact.topk_ids, 50)
    np.testing.assert_allclose(rebuilt.tail_logmass.numpy(), exact.tail_logmass.numpy(), rtol=1e-9)
    # Mass exactly 1 or rounding above 1: zero tail, -inf.
    full = torch.log(torch.tensor([[0.5, 0.5], [0.7, 0.3000001]], dtype=torch.float64))
    assert torch.isneginf(tail_logmass_from_topk(full)).all()
    assert tail_logmass_from_topk(torch.log(torch.tensor([0.25, 0.25]))).item() == pytest.approx(np.log(0.5))


def test_layer_select_tokens_stack_and_to(logits):
    sig = TeacherSignal.from_logits(logits, 4)
    one = sig.layer(2)
    assert one.num_layers == 1 and torch.equal(one.topk_ids[0], sig.topk_ids[2])
    sel = sig.select([2, 0])
    assert torch.equal(sel.tail_logmass, sig.tail_logmass[[2, 0]])
    part = sig.tokens(slice(1, 4))
    assert part.num_tokens == 3 and torch.equal(part.topk_logprobs, sig.topk_logprobs[:, 1:4])
    back = TeacherSignal.stack([sig.layer(j) for j in range(3)])
    assert torch.equal(back.topk_logprobs, sig.topk_logprobs) and back.vocab_size == 50
    moved = sig.to("cpu")
    assert moved.device.type == "cpu" and torch.equal(moved.topk_ids, sig.topk_ids)
    dense = TeacherSignal.from_logits(logits, None)
    assert torch.equal(TeacherSignal.stack([dense.layer(0), dense.layer(1)]).logprobs, dense.logprobs[:2])
    with pytest.raises(IndexError):
        sig.layer(3)
    with pytest.raises(ValueError, match="same form"):
        TeacherSignal.stack([sig.layer(0), dense.layer(0)])


@pytest.mark.parametrize("storage, atol", [("float32", 0.0), ("float16", 2e-2)])
@pytest.mark.parametrize("k", [None, 6])
def test_numpy_codec_round_trip(logits, storage, atol, k):
    sig = TeacherSignal.from_logits(logits, k, temperature=1.5)
    encoded = sig.to_numpy(storage)
    for a in encoded.values():  # what the Ray object store hands back: read-only arrays
        a.setflags(write=False)
    back = TeacherSignal.from_numpy(encoded)
    assert (back.vocab_size, back.temperature, back.k) == (50, 1.5, sig.k)
    if k is None:
        assert encoded["logprobs"].dtype == np.dtype(storage)
        np.testing.assert_allclose(back.logprobs.float().numpy(), sig.logprobs.numpy(), atol=atol, rtol=1e-3 if atol else 0)
    else:
        assert encoded["topk_logprobs"].dtype == np.dtype(storage)
        assert encoded["topk_ids"].dtype == np.int32 and encoded["tail_logmass"].dtype == np.float32
        assert back.topk_ids.dtype == torch.int64 and torch.equal(back.topk_ids, sig.topk_ids)
        np.testing.assert_allclose(
            back.topk_logprobs.float().numpy(), sig.topk_logprobs.numpy(), atol=atol, rtol=1e-3 if atol else 0
        )
        np.testing.assert_array_equal(back.tail_logmass.numpy(), sig.tail_logmass.numpy())


def test_bytes_per_token_per_layer_from_first_principles():
    L, N, V, k = 2, 3, 1000, 64
    sig = TeacherSignal.from_logits(torch.randn(L, N, V), k)
    fp16, int32, fp32, int64 = 2, 4, 4, 8
    assert sig.bytes_per_token_per_layer("float16") == k * (fp16 + int32) + fp32 == 388
    assert sig.bytes_per_token_per_layer("float32") == k * (fp32 + int32) + fp32
    # The layout matches what to_numpy really produces (payload arrays, without 0-d metadata).
    for storage in ("float16", "float32"):
        payload = sum(a.nbytes for a in sig.to_numpy(storage).values() if a.ndim)
        assert payload / (L * N) == sig.bytes_per_token_per_layer(storage)
    # In memory: float32 log-probs, int64 ids, float32 tail.
    assert sig.nbytes == L * N * (k * (fp32 + int64) + fp32)
    assert sig.bytes_per_token_per_layer() == k * (fp32 + int64) + fp32
    dense = TeacherSignal.from_logits(torch.randn(L, N, V), None)
    assert dense.bytes_per_token_per_layer("float16") == V * fp16
    assert dense.nbytes == L * N * V * fp32


def test_sizes_quoted_in_the_method_reference():
    # Qwen2-VL-72B vocabulary, 2048-token sample: dense 16-bit ~0.62 GB per layer, top-64 ~0.8 MB.
    V, tokens = 152_064, 2048
    sig = TeacherSignal.from_logits(torch.randn(1, 1, V), 64)
    assert tokens * TeacherSignal.from_logits(torch.randn(1, 1, V), None).bytes_per_token_per_layer("float16") == pytest.approx(
        0.62e9, rel=0.01
    )
    assert tokens * sig.bytes_per_token_per_layer("float16") == pytest.approx(0.8e6, rel=0.02)


def test_validation_errors_are_one_sentence():
    lp = torch.zeros(1, 2, 3)
    ids = torch.zeros(1, 2, 3, dtype=torch.int64)
    tail = torch.zeros(1, 2)
    cases = [
        (dict(logprobs=torch.zeros(2, 3)), "logprobs must be a float tensor"),
        (dict(logprobs=lp, topk_logprobs=lp), "not both"),
        (dict(topk_logprobs=lp, topk_ids=ids), "needs logprobs, or all of"),
        (dict(topk_logprobs=lp, topk_ids=ids.float(), tail_logmass=tail, vocab_size=5), "topk_ids must be an integer"),
        (dict(topk_logprobs=lp, topk_ids=ids, tail_logmass=torch.zeros(2), vocab_size=5), "tail_logmass must be"),
        (dict(topk_logprobs=lp, topk_ids=ids, tail_logmass=tail), "vocab_size must be given"),
        (dict(logprobs=lp, temperature=0.0), "temperature must be positive"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message) as err:
            TeacherSignal(**kwargs)
        assert str(err.value).count(". ") == 0 and str(err.value).endswith(".")
    with pytest.raises(ValueError, match="k >= 1"):
        TeacherSignal.from_logits(torch.zeros(1, 2, 3), 0)
    with pytest.raises(ValueError, match="unsqueeze"):
        TeacherSignal.from_logits(torch.zeros(2, 3), None)
    with pytest.raises(ValueError, match="storage must be one of"):
        TeacherSignal(logprobs=lp).to_numpy("bfloat16")
    int32_ids = TeacherSignal(topk_logprobs=lp, topk_ids=ids.int(), tail_logmass=tail, vocab_size=5)
    assert int32_ids.topk_ids.dtype == torch.int64
