"""Teacher actors and the client: the same signal as the in-process teacher, pipelining bounds, placement."""

from __future__ import annotations

import json
import os
import time

import numpy as np
import pytest
import ray.data
import torch

from vlsi_ray.config import ConfigError, TeacherPoolConfig, load_config, to_yaml
from vlsi_ray.data.collate import ChatCollator
from vlsi_ray.data.mixture import load_mixture, prepare
from vlsi_ray.data.samples import write_samples
from vlsi_ray.data.shards import read_rows
from vlsi_ray.data.synthetic import corpus_texts, generate_rows
from vlsi_ray.method.losses import verbalized_kl
from vlsi_ray.method.steps import response_positions
from vlsi_ray.models.backbone import Backbone, ModelInfo
from vlsi_ray.models.qwen2_vl import build_tiny
from vlsi_ray.models.tokenizer import train_tokenizer
from vlsi_ray.models.verbalizer import Verbalizers
from vlsi_ray.prepare import LoadSettings, check_tensor_parallel, make_collator, model_info, new_verbalizers
from vlsi_ray.runners.ray.client import TeacherClient
from vlsi_ray.runners.ray.teacher_pool import ENVELOPE, TeacherPool, TeacherWorker
from vlsi_ray.runners.ray.wire import decode_batch, encode_batch
from vlsi_ray.signals.produce import teacher_signal
from vlsi_ray.signals.teacher_signal import TeacherSignal

from tiny_config import make_tiny_overrides


@pytest.fixture(scope="module")
def teacher_dirs(tmp_path_factory, one_thread):
    """A tiny teacher and its (randomly initialised, non-zero) verbalizers saved to disk; some batches."""
    tmp = tmp_path_factory.mktemp("teacher")
    cfg = load_config(None, make_tiny_overrides(tmp, "pool") + ["verbalizer.zero_init=false"])
    rows = generate_rows("train", 48, seed=0)
    tok = train_tokenizer(corpus_texts(rows), "qwen2_vl")
    teacher = build_tiny(
        "teacher",
        tok,
        hidden_size=64,
        num_layers=4,
        num_heads=4,
        intermediate_size=128,
        vision_embed_dim=32,
        vision_depth=1,
        seed=1,
    )
    teacher.save_pretrained(tmp / "teacher")
    verbs = new_verbalizers(cfg, "teacher", teacher, seed=3)
    verbs.save(tmp / "verbs")
    collate = make_collator(teacher, cfg)
    batches = [collate(rows[i : i + 8]) for i in range(0, 48, 8)]
    return tmp / "teacher", tmp / "verbs", batches


def test_wire_round_trip_keeps_tensors_and_ids(teacher_dirs):
    batch = teacher_dirs[2][0]
    back = decode_batch(encode_batch(batch))
    assert back["ids"] == batch["ids"]
    for key, value in batch.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(back[key], value), key


def test_worker_signal_equals_in_process_teacher_signal(teacher_dirs):
    model_dir, verb_dir, batches = teacher_dirs
    worker = TeacherWorker(str(model_dir), str(verb_dir), topk=None, storage="float32", device="cpu")
    out = worker.signal(encode_batch(batches[0]))
    assert out["ids"] == batches[0]["ids"] and float(out["seconds"]) > 0 and out["pid"] == os.getpid()
    reference = teacher_signal(Backbone.from_pretrained(model_dir), Verbalizers.load(verb_dir), batches[0], None)
    assert out["logprobs"].dtype == np.float32
    np.testing.assert_array_equal(out["logprobs"], reference.logprobs.numpy())
    n = int(response_positions(batches[0]["labels"])[0].sum())
    assert out["logprobs"].shape == (4, n, reference.vocab_size)  # t_l = 3 target layers + the final layer


def test_replica_of_a_training_pool_loads_step1_verbalizers_once_saved(teacher_dirs, tmp_path):
    """A pool that trains the verbalizers first starts without them; a replica (re)started after step 1 saved them has them."""
    model_dir, verb_dir, batches = teacher_dirs
    before = TeacherWorker(str(model_dir), None, topk=16, device="cpu", step1_dir=str(tmp_path / "not_yet"))
    assert before.verbalizers is None
    with pytest.raises(RuntimeError, match="no verbalizers yet"):
        before.signal(encode_batch(batches[0]))
    after = TeacherWorker(str(model_dir), None, topk=16, device="cpu", step1_dir=str(verb_dir))
    assert after.verbalizers is not None and after.verbalizers.layers == Verbalizers.load(verb_dir).layers
    assert before.load_verbalizers(str(verb_dir), after=None) == after.verbalizers.layers
    np.testing.assert_array_equal(
        before.signal(encode_batch(batches[0]))["topk_ids"], after.signal(encode_batch(batches[0]))["topk_ids"]
    )


def test_topk_wire_is_388_bytes_per_token_layer_and_only_rounds_the_kl(teacher_dirs):
    """At k = 64 the wire holds 64·(2+4)+4 bytes per token and layer; decoding it gives the in-process
    top-k KL up to float16 rounding, never above the exact KL. (How close top-64 is to the exact KL
    on peaked distributions: tests/method/test_losses.py, within 3% at V = 4096.)"""
    model_dir, verb_dir, batches = teacher_dirs
    sparse = TeacherWorker(str(model_dir), str(verb_dir), topk=64, storage="float16", device="cpu")
    wire = {k: v for k, v in sparse.signal(encode_batch(batches[1])).items() if k not in ENVELOPE}
    compact = TeacherSignal.from_numpy(wire)
    teacher, verbs = Backbone.from_pretrained(model_dir), Verbalizers.load(verb_dir)
    in_process = teacher_signal(teacher, verbs, batches[1], 64)
    exact = teacher_signal(teacher, verbs, batches[1], None)
    n, layers = compact.num_tokens, compact.num_layers
    per_token_layer = sum(v.nbytes for k, v in wire.items() if k not in ("vocab_size", "temperature")) / (n * layers)
    assert per_token_layer == compact.bytes_per_token_per_layer("float16") == 64 * 6 + 4
    torch.manual_seed(0)
    student_logits = torch.randn(n, exact.vocab_size) * 2
    for j in range(layers):
        kl_wire = verbalized_kl(student_logits, lambda h: h, compact.layer(j)).mean().item()
        kl_topk = verbalized_kl(student_logits, lambda h: h, in_process.layer(j)).mean().item()
        kl_exact = verbalized_kl(student_logits, lambda h: h, exact.layer(j)).mean().item()
        assert kl_wire == pytest.approx(kl_topk, rel=1e-3, abs=1e-4)
        assert kl_wire <= kl_exact + 1e-3


@pytest.mark.integration
def test_pool_pipelines_with_bounded_in_flight_requests(local_ray, teacher_dirs):
    model_dir, verb_dir, batches = teacher_dirs
    pool = TeacherPool(TeacherPoolConfig(replicas=2), model_dir, verb_dir, None, 1.0, None, "float32")
    try:
        client = TeacherClient(pool.actors, lookahead=2)
        worker = TeacherWorker(str(model_dir), str(verb_dir), topk=None, storage="float32", device="cpu")
        seen = []
        for batch in client.pipelined(iter(batches)):
            assert client.in_flight <= 3  # the current batch + lookahead
            signal = client(batch)
            expected = worker.signal(encode_batch(batch))["logprobs"]
            np.testing.assert_array_equal(signal.logprobs.numpy(), expected)
            seen.append(batch["ids"])
        assert seen == [b["ids"] for b in batches]
        counters = client.counters()
        assert counters["teacher_requests"] == len(batches) and counters["signal_bytes"] > 0
        infos = local_ray.get([a.info.remote() for a in pool.actors])
        assert sum(i["requests"] for i in infos) == len(batches) and all(i["requests"] == 3 for i in infos)  # round robin
        assert counters["teacher_pids"] == {i["pid"]: 3 for i in infos}  # who answered, as the replicas count it
    finally:
        pool.shutdown()


@pytest.mark.integration
def test_pool_on_a_teacher_still_training_answers_after_step1(local_ray, teacher_dirs, tmp_path):
    """The pool starts on the ObjectRef of a teacher that is not saved yet; a client in another process
    (a Train worker in the runner) sends nothing before the driver's step-1 call has given the replica
    its verbalizers. An actor does not order calls from different callers: here the step-1 call
    reaches the replica seconds after the client's first request would have."""
    model_dir, verb_dir, batches = teacher_dirs

    @local_ray.remote
    def later(path: str, seconds: float) -> str:  # a path that resolves after ``seconds`` (a training task)

        time.sleep(seconds)
        return path

    @local_ray.remote
    def student(client: TeacherClient, batch: dict) -> np.ndarray:
        return client(batch).topk_ids.numpy()

    pool = TeacherPool(
        TeacherPoolConfig(replicas=1),
        later.remote(str(model_dir), 1.0),
        None,
        16,
        1.0,
        None,
        "float32",
        step1_dir=tmp_path / "not_yet",
    )
    try:
        step1 = pool.actors[0].load_verbalizers.remote(later.remote(str(verb_dir), 10.0))
        ids = local_ray.get(student.remote(TeacherClient(pool.actors, ready=[step1]), batches[0]))
        expected = TeacherWorker(str(model_dir), str(verb_dir), topk=16, storage="float32", device="cpu").signal(
            encode_batch(batches[0])
        )
        np.testing.assert_array_equal(ids, expected["topk_ids"])
        assert pool.infos[0]["model_dir"] == str(model_dir)
    finally:
        pool.shutdown()


@pytest.mark.integration
def test_teacher_and_student_get_different_fake_gpus(local_ray, teacher_dirs):
    model_dir, verb_dir, _ = teacher_dirs
    cfg = TeacherPoolConfig(replicas=1)
    cfg.resources.num_gpus = 1
    pool = TeacherPool(cfg, model_dir, verb_dir, 8, 1.0, None, "float16")
    try:
        teacher_gpus = pool.infos[0]["gpu_ids"]
        student_gpus = local_ray.get(local_ray.remote(num_gpus=1)(lambda: [str(g) for g in local_ray.get_gpu_ids()]).remote())
        assert len(teacher_gpus) == 1 and len(student_gpus) == 1
        assert teacher_gpus != student_gpus
        assert pool.infos[0]["device"] == "cpu"  # fake GPUs: CUDA itself is not there
    finally:
        pool.shutdown()


# ------------------------------------------------------------------------------------------ tail samples
def test_worker_and_in_process_teacher_send_the_same_samples(teacher_dirs):
    """The Ray runner's teacher actor and the in-process runner build the same signal, samples included;
    a fresh worker (what Ray restarts) repeats them; another batch or seed draws others."""
    model_dir, verb_dir, batches = teacher_dirs
    teacher, verbs = Backbone.from_pretrained(model_dir), Verbalizers.load(verb_dir)
    reference = teacher_signal(teacher, verbs, batches[0], 8, tail_samples=5, seed=11)
    assert reference.tail_samples == 5 and reference.num_layers == len(verbs.layers) + 1

    def answer(worker, batch):
        return {k: v for k, v in worker.signal(encode_batch(batch)).items() if k not in ENVELOPE}

    worker = TeacherWorker(str(model_dir), str(verb_dir), topk=8, storage="float32", device="cpu", tail_samples=5, seed=11)
    out = answer(worker, batches[0])
    np.testing.assert_array_equal(out["tail_sample_ids"], reference.tail_sample_ids.numpy())
    np.testing.assert_array_equal(out["tail_sample_logprobs"], reference.tail_sample_logprobs.numpy())
    np.testing.assert_array_equal(out["topk_ids"], reference.topk_ids.numpy())
    answer(worker, batches[1])  # other requests in between change nothing
    restarted = TeacherWorker(str(model_dir), str(verb_dir), topk=8, storage="float32", device="cpu", tail_samples=5, seed=11)
    for again in (answer(worker, batches[0]), answer(restarted, batches[0])):
        assert again.keys() == out.keys()
        for key in out:
            np.testing.assert_array_equal(again[key], out[key])
    # Another seed, or the same rows under other ids (the same logits), draw other samples.
    renamed = dict(batches[0], ids=[f"{i}-copy" for i in batches[0]["ids"]])
    for other in (
        teacher_signal(teacher, verbs, batches[0], 8, tail_samples=5, seed=12),
        teacher_signal(teacher, verbs, renamed, 8, tail_samples=5, seed=11),
    ):
        assert torch.equal(other.topk_ids, reference.topk_ids)
        assert not torch.equal(other.tail_sample_ids, reference.tail_sample_ids)
    # Without samples the worker sends exactly what it sent before: no sample arrays.
    plain = answer(TeacherWorker(str(model_dir), str(verb_dir), topk=8, storage="float32", device="cpu"), batches[0])
    assert sorted(plain) == ["tail_logmass", "temperature", "topk_ids", "topk_logprobs", "vocab_size"]
    np.testing.assert_array_equal(plain["topk_logprobs"], out["topk_logprobs"])


def test_teacher_signal_with_samples_needs_row_ids(teacher_dirs):
    model_dir, verb_dir, batches = teacher_dirs
    batch = {k: v for k, v in batches[0].items() if k != "ids"}
    teacher, verbs = Backbone.from_pretrained(model_dir), Verbalizers.load(verb_dir)
    with pytest.raises(KeyError, match="row 'ids'"):
        teacher_signal(teacher, verbs, batch, 8, tail_samples=2)
    assert teacher_signal(teacher, verbs, batch, 8).tail_samples == 0  # without samples ids are not needed


# ------------------------------------------------------------------------------------------ tensor parallel


def _same_signal(got: TeacherSignal, expected: TeacherSignal, atol: float) -> None:
    """The same top-k ids per token and layer (as sets: ties may order them differently), log-probs and tail to ``atol``."""
    order_got, order_exp = got.topk_ids.sort(-1), expected.topk_ids.sort(-1)
    assert torch.equal(order_got.values, order_exp.values)
    values_got = got.topk_logprobs.gather(-1, order_got.indices)
    values_exp = expected.topk_logprobs.gather(-1, order_exp.indices)
    torch.testing.assert_close(values_got, values_exp, rtol=0, atol=atol)
    torch.testing.assert_close(got.tail_logmass, expected.tail_logmass, rtol=0, atol=atol)


@pytest.mark.integration
def test_tensor_parallel_replica_sends_the_single_process_signal_and_restarts_whole_when_a_rank_dies(local_ray, teacher_dirs):
    """One replica of two ranks (transformers' tensor-parallel plan over gloo): the signal of every batch
    equals one process's to 1e-5 (float32; the ranks' partial sums are added in another order), and
    when the last rank kills itself at request 3 its peer is killed too, a new pair joins a new
    rendezvous and the request is retried inside the replica: the student sees every answer once."""
    model_dir, verb_dir, batches = teacher_dirs
    pool = TeacherPool(
        TeacherPoolConfig(replicas=1, tensor_parallel=2, kill_at_request=3), model_dir, verb_dir, 16, 1.0, None, "float32"
    )
    try:
        first = local_ray.get(pool.actors[0].info.remote())
        assert first["generation"] == 0 and first["rank"] == 0 and len(set(first["rank_pids"])) == 2
        vocab = ModelInfo.from_pretrained(model_dir).vocab_size
        assert first["world"] == 2 and first["lm_head_rows"] == vocab // 2  # rank 0 holds half the LM head
        client = TeacherClient(pool.actors, lookahead=1)
        reference = TeacherWorker(str(model_dir), str(verb_dir), topk=16, storage="float32", device="cpu")
        answered = 0
        for batch in client.pipelined(iter(batches)):
            expected = reference.signal(encode_batch(batch))
            for key in ENVELOPE:
                expected.pop(key)
            _same_signal(client(batch), TeacherSignal.from_numpy(expected), atol=1e-5)
            answered += 1
        assert answered == len(batches)
        after = local_ray.get(pool.actors[0].info.remote())
        assert after["generation"] == 1 and not set(after["rank_pids"]) & set(first["rank_pids"])  # both ranks new
        assert client.counters()["teacher_resubmissions"] == 0  # the replica retried the request itself
    finally:
        pool.shutdown()


def test_tensor_parallel_must_divide_the_heads_and_match_the_gpus(teacher_dirs, tmp_path):
    model_dir, _, _ = teacher_dirs
    info = ModelInfo.from_pretrained(model_dir)  # 4 attention heads, 2 key/value heads
    check_tensor_parallel(info, 2)
    with pytest.raises(
        ConfigError,
        match=r"tensor_parallel=4 does not divide the teacher's 4 attention and 2 key/value heads; use one of \[1, 2\]",
    ):
        check_tensor_parallel(info, 4)
    base = make_tiny_overrides(tmp_path, "tp")
    with pytest.raises(ConfigError, match="one rank per GPU; set num_gpus to tensor_parallel"):
        load_config(None, base + ["teacher_pool.tensor_parallel=2", "teacher_pool.resources.num_gpus=1"])
    with pytest.raises(ConfigError, match="tensor_parallel=0 must be at least 1"):
        load_config(None, base + ["teacher_pool.tensor_parallel=0"])


@pytest.mark.integration
def test_step1_data_parallel_over_two_replicas_trains_the_verbalizers_one_replica_does(local_ray, teacher_dirs, tmp_path):
    """Two replicas each take every other micro-batch of an optimizer step (4 micro-batches of 4 rows, 3 steps)
    and average their gradients: the verb-FFNs equal those one replica trains on all four (float32, to 1e-6:
    the sum is taken in another order), on both replicas; replica 0 saves them."""
    model_dir, _, _ = teacher_dirs
    cfg, cfg_yaml, dataset, _ = _step1_single(model_dir, tmp_path, ["teacher_pool.replicas=2"])
    rows = generate_rows("train", 48, seed=5)
    pool = TeacherPool(cfg.teacher_pool, model_dir, None, 16, 1.0, None, "float32", step1_dir=tmp_path / "dp")
    try:
        groups = pool.step1_data_parallel()
        assert [g["rank"] for g in groups] == [0, 1] and all(g["world"] == 2 for g in groups)
        results = local_ray.get(
            [a.train_verbalizers.remote(cfg_yaml, dataset, 3, str(tmp_path / "dp"), 7, g) for a, g in zip(pool.actors, groups)]
        )
        assert all(len(r["history"]) == 3 for r in results)
        expected = Verbalizers.load(tmp_path / "single").state_dict()
        saved = Verbalizers.load(tmp_path / "dp").state_dict()
        for name, weight in expected.items():
            torch.testing.assert_close(saved[name], weight, rtol=0, atol=1e-6)
        assert any(not torch.equal(w, Verbalizers(64, [1, 2, 3]).state_dict()[n]) for n, w in expected.items())  # it trained
        batch = encode_batch(_collated(model_dir, cfg, rows[:8]))
        answers = local_ray.get([a.signal.remote(batch) for a in pool.actors])  # both replicas hold the trained verb-FFNs
        np.testing.assert_array_equal(answers[0]["topk_ids"], answers[1]["topk_ids"])
        np.testing.assert_allclose(answers[0]["topk_logprobs"], answers[1]["topk_logprobs"], atol=1e-6)
    finally:
        pool.shutdown()


@pytest.mark.integration
@pytest.mark.parametrize("optimizer", ["zero2-offload", "replicated"])
def test_step1_on_two_tensor_parallel_replicas_with_split_verbalizers(local_ray, teacher_dirs, tmp_path, optimizer):
    """The 6:2 plan's step 1 in small: 2 replicas × 2 tensor-parallel ranks, each verb-FFN split over a replica's
    ranks (teacher_pool.shard_verbalizers), its AdamW state split over the replicas on the host
    (step1_optimizer=zero2-offload) or whole on each (replicated: AdamW on the ranks' DTensor shards, gradients
    averaged over the replicas shard by shard). The saved verb-FFNs (gathered; offloaded: the float32 masters)
    equal those one process trains with plain AdamW (float32, to 1e-5: sums in another order), a rank holds half
    of them, and the replicas then send the signal one process sends with the saved verb-FFNs."""
    model_dir, _, batches = teacher_dirs
    cfg, cfg_yaml, dataset, history = _step1_single(
        model_dir,
        tmp_path,
        [
            "stages.verbalize.grad_clip=0.05",  # clipping takes part: the norm adds the ranks' and replicas' slices
            "teacher_pool.replicas=2",
            "teacher_pool.tensor_parallel=2",
            "teacher_pool.shard_verbalizers=true",
            f"teacher_pool.step1_optimizer={optimizer}",
        ],
    )
    norms = [r["grad_norm"] for r in history]
    assert min(norms) > 0.05
    pool = TeacherPool(cfg.teacher_pool, model_dir, None, 16, 1.0, None, "float32", step1_dir=tmp_path / "tpdp")
    try:
        groups = pool.step1_data_parallel()
        results = local_ray.get(
            [a.train_verbalizers.remote(cfg_yaml, dataset, 3, str(tmp_path / "tpdp"), 7, g) for a, g in zip(pool.actors, groups)]
        )
        assert [r["grad_norm"] for r in results[0]["history"]] == pytest.approx(norms, rel=1e-4)
        expected = Verbalizers.load(tmp_path / "single").state_dict()
        saved = Verbalizers.load(tmp_path / "tpdp").state_dict()
        for name, weight in expected.items():
            torch.testing.assert_close(saved[name], weight, rtol=0, atol=1e-5)
        info = local_ray.get(pool.actors[0].info.remote())
        assert info["verbalizer_elements"] == sum(w.numel() for w in expected.values()) // 2  # half the verb-FFNs a rank
        reference = TeacherWorker(str(model_dir), str(tmp_path / "single"), topk=16, storage="float32", device="cpu")
        for batch in batches[:2]:
            wire = encode_batch(batch)
            want = reference.signal(wire)
            for answer in local_ray.get([a.signal.remote(wire) for a in pool.actors]):
                for key in ENVELOPE:
                    answer.pop(key, None)
                    want.pop(key, None)
                _same_signal(TeacherSignal.from_numpy(answer), TeacherSignal.from_numpy(want), atol=1e-5)
    finally:
        pool.shutdown()


def _step1_single(model_dir, tmp_path, overrides: list[str]):
    """Step 1's config (4 micro-batches of 4 rows a step) with ``overrides``, its yaml, 48 rows as an ordered
    Ray Dataset, and one process's training of the teacher's verb-FFNs on them (3 steps, saved to
    ``tmp_path / "single"``; its history returned)."""
    base = ["stages.verbalize.batch_size=4", "stages.verbalize.grad_accum=4", "stages.verbalize.lr=3e-3"]
    cfg = load_config(None, make_tiny_overrides(tmp_path, "step1") + base + overrides)
    ray.data.DataContext.get_current().execution_options.preserve_order = True
    dataset = ray.data.from_items(generate_rows("train", 48, seed=5))
    cfg_yaml = to_yaml(cfg)
    single = TeacherWorker(str(model_dir), device="cpu")
    history = single.train_verbalizers(cfg_yaml, dataset, 3, str(tmp_path / "single"), seed=7)["history"]
    return cfg, cfg_yaml, dataset, history


def _collated(model_dir, cfg, rows) -> dict:
    return make_collator(Backbone.from_pretrained(model_dir), cfg)(rows)


def test_step1_data_parallel_needs_grad_accum_to_split_over_the_replicas(tmp_path):
    base = make_tiny_overrides(tmp_path, "dp") + ["teacher_pool.replicas=2", "stages.verbalize.grad_accum=3"]
    with pytest.raises(ConfigError, match=r"stages.verbalize.grad_accum=3 does not split over teacher_pool.replicas=2"):
        load_config(None, base)
    assert load_config(None, base + ["teacher_pool.step1_data_parallel=false"]).teacher_pool.replicas == 2


def test_step1_optimizer_must_be_known_and_offloaded_only_without_float16(tmp_path):
    base = make_tiny_overrides(tmp_path, "opt")
    with pytest.raises(ConfigError, match=r"step1_optimizer='zero3' is not one of replicated, zero2-offload; pick one"):
        load_config(None, base + ["teacher_pool.step1_optimizer=zero3"])
    with pytest.raises(ConfigError, match="zero2-offload has no float16 loss scaling; set teacher.dtype=bfloat16"):
        load_config(None, base + ["teacher_pool.step1_optimizer=zero2-offload", "teacher.dtype=float16"])
    assert (
        load_config(None, base + ["teacher_pool.step1_optimizer=zero2-offload"]).teacher_pool.step1_optimizer == "zero2-offload"
    )


@pytest.mark.integration
def test_tensor_parallel_replica_of_a_hub_bf16_teacher_on_converted_rows(local_ray, hub_worlds, tmp_path):
    """The released layout (bfloat16 safetensors shards, config.json, chat template), loaded in float32, and one
    batch of converted sample rows (text only, two images, three turns with a system turn): TP=2, with the
    verb-FFNs split over the two ranks, sends one process's signal to 1e-5."""
    world = hub_worlds("qwen2_vl")
    info = model_info(world.teacher, LoadSettings("teacher"))
    collator = ChatCollator(info.tokenizer, info.image_processor, info.family)
    prepare(load_mixture(write_samples(tmp_path / "samples", rows=5)), tmp_path / "shards", collator=collator, command="test")
    rows, _ = read_rows(tmp_path / "shards", "train")
    kinds = {
        "text only": lambda r: len(r["images"]) == 0,
        "two images": lambda r: len(r["images"]) >= 2,
        "three turns": lambda r: sum(m["role"] == "user" for m in json.loads(r["messages"])) >= 2,
    }
    batch_rows = [next(r for r in rows if wanted(r)) for wanted in kinds.values()]
    Verbalizers(info.hidden_size, [1, 2], zero_init=False).save(tmp_path / "verbs")
    load = LoadSettings("teacher", dtype="float32")
    batch = encode_batch(collator(batch_rows))
    reference = TeacherWorker(str(world.teacher), str(tmp_path / "verbs"), topk=16, storage="float32", device="cpu", load=load)
    expected = reference.signal(batch)
    pool = TeacherPool(
        TeacherPoolConfig(replicas=1, tensor_parallel=2, shard_verbalizers=True),
        world.teacher,
        tmp_path / "verbs",
        16,
        1.0,
        None,
        "float32",
        load=load,
    )
    try:
        got = local_ray.get(pool.actors[0].signal.remote(batch))
        placed = local_ray.get(pool.actors[0].info.remote())
        assert placed["lm_head_rows"] == info.vocab_size // 2
        assert placed["verbalizer_elements"] == 2 * 3 * info.hidden_size**2 // 2  # half of each of the 2 verb-FFNs
    finally:
        pool.shutdown()
    for key in ENVELOPE:
        expected.pop(key), got.pop(key)
    _same_signal(TeacherSignal.from_numpy(got), TeacherSignal.from_numpy(expected), atol=1e-5)
