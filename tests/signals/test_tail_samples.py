"""Tail samples of a top-k signal: what is drawn, the codec, seeding per batch, the config key, and the
teacher side (in-process teacher_signal and a TeacherWorker, without Ray) sending the same samples."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vlsi_ray.config import ConfigError, load_config
from vlsi_ray.signals.teacher_signal import TeacherSignal, tail_sample_generator

V, K = 50, 5


@pytest.fixture
def logits() -> torch.Tensor:
    return torch.randn(3, 4, V, generator=torch.Generator().manual_seed(0)) * 2


def _sampled(logits: torch.Tensor, m: int, seed: int = 0, k: int = K) -> TeacherSignal:
    return TeacherSignal.from_logits(logits, k, tail_samples=m, generator=torch.Generator().manual_seed(seed))


def test_draws_are_tail_ids_with_their_logprobs_distributed_as_the_tail(logits):
    sig = _sampled(logits, 200_000)
    plain = TeacherSignal.from_logits(logits, K)
    # The top-k part is the plain signal's, bit for bit.
    for name in ("topk_logprobs", "topk_ids", "tail_logmass"):
        assert torch.equal(getattr(sig, name), getattr(plain, name)), name
    assert sig.tail_samples == 200_000 and sig.tail_sample_ids.dtype == torch.int64
    assert sig.tail_sample_ids.shape == sig.tail_sample_logprobs.shape == (3, 4, 200_000)
    lp = torch.log_softmax(logits, -1)
    assert torch.equal(sig.tail_sample_logprobs, lp.gather(-1, sig.tail_sample_ids))
    # No draw is a top-k id; the frequencies are p' = p / P over the tail (SE <= 0.0011 at 200k draws).
    in_top = (sig.tail_sample_ids[..., :, None] == sig.topk_ids[..., None, :]).any(-1)
    assert not in_top.any()
    counts = torch.zeros(3, 4, V).scatter_add_(-1, sig.tail_sample_ids, torch.ones(3, 4, 200_000))
    expected = (lp.scatter(-1, plain.topk_ids, float("-inf")) - plain.tail_logmass[..., None]).exp()
    assert (counts / 200_000 - expected).abs().max().item() < 0.006


def test_k_at_least_vocab_draws_nothing_and_stays_exact(logits):
    sig = _sampled(logits, 8, k=V)
    assert sig.tail_samples == 0 and sig.tail_sample_ids is None and sig.tail_sample_logprobs is None
    plain = TeacherSignal.from_logits(logits, V)
    assert torch.equal(sig.topk_logprobs, plain.topk_logprobs) and torch.isneginf(sig.tail_logmass).all()
    assert sorted(sig.to_numpy()) == sorted(plain.to_numpy())


def test_rows_with_no_tail_mass_get_empty_draws(logits):
    logits = logits.clone()
    logits[0, 1, 3:] = float("-inf")  # 3 possible tokens < k = 5: nothing is left for the tail
    sig = _sampled(logits, 16)
    assert torch.isneginf(sig.tail_logmass[0, 1])
    assert (sig.tail_sample_ids[0, 1] == 0).all() and torch.isneginf(sig.tail_sample_logprobs[0, 1]).all()
    others = torch.ones(3, 4, dtype=torch.bool)
    others[0, 1] = False
    assert torch.isfinite(sig.tail_sample_logprobs[others]).all()


@pytest.mark.parametrize("storage, atol", [("float32", 0.0), ("float16", 2e-2)])
def test_codec_round_trip_with_tail_samples(logits, storage, atol):
    logits = logits.clone()
    logits[1, 2, 3:] = float("-inf")  # one row with empty draws: -inf must survive the codec
    sig = TeacherSignal.from_logits(logits, K, temperature=1.5, tail_samples=7, generator=torch.Generator().manual_seed(1))
    encoded = sig.to_numpy(storage)
    for a in encoded.values():  # the object store hands back read-only arrays
        a.setflags(write=False)
    assert encoded["tail_sample_ids"].dtype == np.int32 and encoded["tail_sample_logprobs"].dtype == np.dtype(storage)
    back = TeacherSignal.from_numpy(encoded)
    assert (back.k, back.tail_samples, back.temperature, back.vocab_size) == (K, 7, 1.5, V)
    assert back.tail_sample_ids.dtype == torch.int64 and torch.equal(back.tail_sample_ids, sig.tail_sample_ids)
    got, want = back.tail_sample_logprobs.float().numpy(), sig.tail_sample_logprobs.numpy()
    np.testing.assert_array_equal(np.isneginf(got), np.isneginf(want))
    assert np.isneginf(got[1, 2]).all()
    finite = np.isfinite(want)
    np.testing.assert_allclose(got[finite], want[finite], atol=atol, rtol=1e-3 if atol else 0)
    # Bytes: (k + m)·(s + 4) + 4 per token and layer, as the payload really is.
    payload = sum(a.nbytes for a in encoded.values() if a.ndim)
    assert payload / (3 * 4) == sig.bytes_per_token_per_layer(storage) == (K + 7) * (np.dtype(storage).itemsize + 4) + 4


def test_bytes_at_k64_with_32_samples_are_580():
    sig = TeacherSignal.from_logits(torch.randn(1, 2, 1000), 64, tail_samples=32)
    assert sig.bytes_per_token_per_layer("float16") == 580 and sig.bytes_per_token_per_layer("float32") == 772


def test_views_carry_the_tail_samples(logits):
    sig = _sampled(logits, 6)
    assert torch.equal(sig.layer(2).tail_sample_ids[0], sig.tail_sample_ids[2])
    assert torch.equal(sig.select([2, 0]).tail_sample_logprobs, sig.tail_sample_logprobs[[2, 0]])
    assert torch.equal(sig.tokens(slice(1, 3)).tail_sample_ids, sig.tail_sample_ids[:, 1:3])
    back = TeacherSignal.stack([sig.layer(j) for j in range(3)])
    assert torch.equal(back.tail_sample_ids, sig.tail_sample_ids) and torch.equal(
        back.tail_sample_logprobs, sig.tail_sample_logprobs
    )
    assert torch.equal(sig.to("cpu").tail_sample_ids, sig.tail_sample_ids)
    with pytest.raises(ValueError, match="tail_samples"):
        TeacherSignal.stack([sig.layer(0), TeacherSignal.from_logits(logits, K).layer(0)])


def test_same_seed_and_ids_draw_the_same_samples_other_ids_or_seed_other_ones(logits):
    def draw(seed, ids):
        return TeacherSignal.from_logits(logits, K, tail_samples=16, generator=tail_sample_generator(seed, ids)).tail_sample_ids

    reference = draw(7, ["row-1", "row-2"])
    assert torch.equal(draw(7, ["row-1", "row-2"]), reference)
    assert torch.equal(draw(7, np.array(["row-1", "row-2"])), reference)  # ids compared as strings, as batch_key does
    for seed, ids in ((7, ["row-1", "row-3"]), (7, ["row-2", "row-1"]), (8, ["row-1", "row-2"]), (7, ["row-1"])):
        assert not torch.equal(draw(seed, ids), reference), (seed, ids)
    # A hash, not Python's salted hash(): the same in every process (a restarted actor), pinned here.
    assert tail_sample_generator(0, ["a"]).initial_seed() == 3747178068638335176


def test_draws_do_not_depend_on_threads_or_on_autograd(logits):
    """What the teacher actor and the in-process runner may differ in: torch threads, grad mode."""
    reference = _sampled(logits, 8).tail_sample_ids
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2 if threads == 1 else 1)
        assert torch.equal(_sampled(logits, 8).tail_sample_ids, reference)
    finally:
        torch.set_num_threads(threads)
    tracked = logits.clone().requires_grad_(True)
    sig = _sampled(tracked, 8)
    assert torch.equal(sig.tail_sample_ids, reference)
    sig.tail_logmass.sum().backward()  # drawing did not overwrite what the tail's backward needs
    assert torch.isfinite(tracked.grad).all() and tracked.grad.abs().sum() > 0


def test_sample_validation_errors(logits):
    with pytest.raises(ValueError, match="tail_samples >= 0"):
        TeacherSignal.from_logits(logits, K, tail_samples=-1)
    with pytest.raises(ValueError, match="only with a top-k signal"):
        TeacherSignal.from_logits(logits, None, tail_samples=4)
    sig = _sampled(logits, 4)
    parts = {"topk_logprobs": sig.topk_logprobs, "topk_ids": sig.topk_ids, "tail_logmass": sig.tail_logmass, "vocab_size": V}
    with pytest.raises(ValueError, match="both tail_sample_ids and tail_sample_logprobs"):
        TeacherSignal(**parts, tail_sample_ids=sig.tail_sample_ids)
    with pytest.raises(ValueError, match="tail_sample_ids must be an integer tensor"):
        TeacherSignal(**parts, tail_sample_ids=sig.tail_sample_ids[..., :3], tail_sample_logprobs=sig.tail_sample_logprobs)
    with pytest.raises(ValueError, match="tail_sample_logprobs must be a float tensor"):
        TeacherSignal(**parts, tail_sample_ids=sig.tail_sample_ids, tail_sample_logprobs=sig.tail_sample_ids)
    encoded = sig.to_numpy()
    del encoded["tail_sample_ids"]
    with pytest.raises(ValueError, match="both 'tail_sample_ids' and 'tail_sample_logprobs'"):
        TeacherSignal.from_numpy(encoded)


# ------------------------------------------------------------------------------------------ config
def test_config_tail_samples_default_and_validation():
    assert load_config().signal.tail_samples == 0  # the demo numbers were measured without samples
    assert load_config(None, ["signal.tail_samples=32"]).signal.tail_samples == 32
    with pytest.raises(ConfigError, match=r"^signal\.tail_samples=-1 must be 0 \(no tail samples\) or more\.$"):
        load_config(None, ["signal.tail_samples=-1"])
    with pytest.raises(ConfigError, match=r"signal\.tail_samples=4 needs a top-k signal"):
        load_config(None, ["signal.tail_samples=4", "signal.topk=null"])


def test_cat_tokens_inverts_token_slices(logits):
    sig = _sampled(logits, 8)
    parts = [sig.tokens(slice(0, 1)), sig.tokens(slice(1, 4))]
    back = TeacherSignal.cat_tokens(parts)
    for name, tensor in sig._named_tensors().items():
        if tensor is not None:
            assert torch.equal(getattr(back, name), tensor), name
    with pytest.raises(ValueError, match="cat_tokens needs signals with the same form"):
        TeacherSignal.cat_tokens([sig.tokens(slice(0, 1)), TeacherSignal.from_logits(logits, K).tokens(slice(1, 4))])
