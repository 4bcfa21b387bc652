"""ChatCollator: labels, image placeholders, padding, prompt-only batches, caching, row errors."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import io
import json
import pickle

import pytest
import torch
from PIL import Image, ImageDraw

from vlsi_ray.data.collate import IGNORE_INDEX, ChatCollator, RowError
from vlsi_ray.models import llava_onevision, qwen2_vl
from vlsi_ray.models.tokenizer import train_tokenizer

MODULES = {"qwen2_vl": qwen2_vl, "llava_onevision": llava_onevision}
QUESTION = "What colour is the star?\nA. red\nB. green\nC. blue\nD. yellow\nAnswer with the option's letter."
CAPTION = "red star top left. blue square with a dot bottom right."
TEXTS = [QUESTION, CAPTION, "A", "B", "C", "D"] * 20
IMAGE_TOKENS = {"qwen2_vl": 16, "llava_onevision": 36}
#: What follows an assistant turn's text in each released template (llava-hf puts no newline between turns).
TURN_END = {"qwen2_vl": "<|im_end|>\n", "llava_onevision": "<|im_end|>"}


def as_trained(tok, messages: list[dict], family: str) -> str:
    """A one-turn conversation as the collator trains on it: the generation prompt, the answer, the turn's end."""
    answer = messages[-1]["content"][0]["text"]
    return tok.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True) + answer + TURN_END[family]


def png(seed: int, size=(112, 112)) -> bytes:
    image = Image.new("RGB", size, "white")
    ImageDraw.Draw(image).ellipse([seed % 50, 10, 50 + seed % 50, 70], fill=("red", "green", "blue", "yellow")[seed % 4])
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def row(i: int, answer: str, image: bytes | None = None, question: str = QUESTION) -> dict:
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]},
        {"role": "assistant", "content": [{"type": "text", "text": answer}]},
    ]
    return {
        "id": f"row-{i}",
        "images": [image or png(i)],
        "messages": json.dumps(messages),
        "answer": answer,
        "task": "colour",
        "split": "train",
    }


@pytest.fixture(scope="module", params=list(MODULES))
def setup(request):
    family = request.param
    tok = train_tokenizer(TEXTS, family)
    student = MODULES[family].build_tiny("student", tok)
    collator = ChatCollator(tok, student.image_processor, family)
    rows = [row(0, "B"), row(1, CAPTION), row(2, "D", question="Which shape?\nA. star\nB. square\nC. circle\nD. ring\nAnswer.")]
    return family, tok, student, collator, rows


def test_labels_are_exactly_the_answer_and_end_of_turn(setup):
    _, tok, _, collator, rows = setup
    batch = collator(rows)
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    for i, answer in enumerate(["B", CAPTION, "D"]):
        labels = batch["labels"][i]
        kept = labels[labels != IGNORE_INDEX].tolist()
        assert kept == tok.encode(answer, add_special_tokens=False) + [eos]
        positions = (labels != IGNORE_INDEX).nonzero().flatten()
        assert torch.equal(batch["input_ids"][i, positions], labels[positions])  # labels sit on their own tokens
        assert positions.tolist() == list(range(positions[0], positions[-1] + 1))  # one contiguous span
    assert batch["ids"] == ["row-0", "row-1", "row-2"]


def test_tokens_match_the_generation_prompt_and_the_rendered_answer(setup):
    """Qwen2-VL: the whole rendered conversation. llava-hf's template renders ``assistant \\n`` but prompts
    generation with ``assistant\\n``: the collator trains on the latter, as the model will be prompted."""
    family, tok, _, collator, rows = setup
    batch = collator(rows[:1])
    messages = json.loads(rows[0]["messages"])
    text = as_trained(tok, messages, family)
    if family == "qwen2_vl":
        assert text == tok.apply_chat_template(messages, tokenize=False)
    else:
        assert (
            tok.apply_chat_template(messages, tokenize=False).replace("<|im_start|>assistant \n", "<|im_start|>assistant\n")
            == text
        )
    image_token = collator.spec.image_token
    text = text.replace(image_token, image_token * IMAGE_TOKENS[family])
    assert batch["input_ids"][0].tolist() == tok(text, add_special_tokens=False)["input_ids"]


def test_image_tokens_match_the_vision_tower(setup):
    family, _, student, collator, rows = setup
    batch = collator(rows)
    per_row = (batch["input_ids"] == student.image_token_id).sum(dim=1)
    assert per_row.tolist() == [IMAGE_TOKENS[family]] * 3
    with torch.no_grad():  # the model itself refuses a mismatch between placeholders and features
        features = student.model.get_image_features(
            **{
                k: batch[k]
                for k in student.spec.model_input_names
                if k not in ("input_ids", "attention_mask", "mm_token_type_ids")
            }
        )
        out = student.forward(batch)
    assert sum(f.shape[0] for f in features.pooler_output) == int(per_row.sum())
    assert out.logits.shape[:2] == batch["input_ids"].shape
    if family == "qwen2_vl":
        assert batch["pixel_values"].shape == (3 * 64, 1176) and batch["image_grid_thw"].tolist() == [[1, 8, 8]] * 3
    else:
        assert batch["pixel_values"].shape == (3, 2, 3, 112, 112) and batch["image_sizes"].tolist() == [[112, 112]] * 3


def test_matches_the_transformers_processor(setup):
    """Same input_ids and pixels as the family's own processor (built without a video processor)."""
    family, tok, student, collator, _ = setup
    from transformers import LlavaOnevisionProcessor, Qwen2VLProcessor  # noqa: PLC0415 (transformers loads on use (after the offline defaults are set))

    base, kwargs = (
        (Qwen2VLProcessor, {})
        if family == "qwen2_vl"
        else (LlavaOnevisionProcessor, {"num_image_tokens": 16, "vision_feature_select_strategy": "full"})
    )

    class Processor(base):
        def check_argument_for_proper_class(self, name, arg):  # torchvision-free: skip the video-class check
            return None

    processor = Processor(image_processor=student.image_processor, tokenizer=tok, **kwargs)
    for size in [(112, 112), (224, 168), (90, 300)]:
        sample = row(5, "A", image=png(5, size))
        ours = collator([sample])
        image = Image.open(io.BytesIO(sample["images"][0])).convert("RGB")
        theirs = processor(text=[as_trained(tok, json.loads(sample["messages"]), family)], images=[image], return_tensors="pt")
        assert torch.equal(ours["input_ids"], theirs["input_ids"]), size
        assert torch.equal(ours["pixel_values"], theirs["pixel_values"].float()), size
        if family == "qwen2_vl":
            assert torch.equal(ours["mm_token_type_ids"], theirs["mm_token_type_ids"].int())


def test_right_padding(setup):
    _, tok, _, collator, rows = setup
    batch = collator(rows)
    lengths = batch["attention_mask"].sum(dim=1)
    assert lengths.max() == batch["input_ids"].shape[1] and lengths.min() < lengths.max()
    for i, n in enumerate(lengths.tolist()):
        assert batch["attention_mask"][i, :n].all() and not batch["attention_mask"][i, n:].any()
        assert (batch["input_ids"][i, n:] == tok.pad_token_id).all() and (batch["labels"][i, n:] == IGNORE_INDEX).all()


def test_prompt_only_ends_with_the_generation_prompt(setup):
    _, tok, _, collator, rows = setup
    batch = collator(rows, prompt_only=True)
    assert "labels" not in batch
    prompt = tok("<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
    assert (batch["input_ids"][:, -len(prompt) :] == torch.tensor(prompt)).all()
    assert batch["attention_mask"][:, -1].all()  # left padding
    lengths = batch["attention_mask"].sum(dim=1)
    assert lengths.min() < batch["input_ids"].shape[1]
    full = collator(rows)
    for i, n in enumerate(lengths.tolist()):
        assert not batch["attention_mask"][i, : batch["input_ids"].shape[1] - n].any()
        # the prompt is exactly the training sequence up to the first answer token
        first_label = int((full["labels"][i] != IGNORE_INDEX).nonzero()[0])
        assert batch["input_ids"][i, -n:].tolist() == full["input_ids"][i, :first_label].tolist()
    prompt_collator = ChatCollator(tok, collator.image_processor, collator.family, prompt_only=True)
    assert torch.equal(prompt_collator(rows)["input_ids"], batch["input_ids"])


def test_image_cache_and_pickling(setup):
    _, tok, student, _, rows = setup
    collator = ChatCollator(tok, student.image_processor, student.family, cache_size=2)
    first = collator(rows)
    assert len(collator._cache) == 2  # LRU bound
    second = collator(rows + [row(9, "A", image=rows[0]["images"][0])])
    assert torch.equal(second["pixel_values"][: first["pixel_values"].shape[0]], first["pixel_values"])
    clone = pickle.loads(pickle.dumps(collator))
    assert len(clone._cache) == 0 and torch.equal(clone(rows)["input_ids"], first["input_ids"])
    columns = {key: [r[key] for r in rows] for key in rows[0]}  # Ray Data passes columns
    assert torch.equal(collator(columns)["input_ids"], first["input_ids"])


def test_text_memo_is_per_conversation_and_exact(setup):
    """The tokenized text is memoized by conversation: a repeat gives what a fresh collator gives."""
    _, tok, student, _, rows = setup
    collator = ChatCollator(tok, student.image_processor, student.family)
    repeat = dict(rows[0], id="again", images=rows[1]["images"])  # the same conversation, another image
    batch = collator(rows + [repeat])
    assert len(collator._text) == len({r["messages"] for r in rows})
    fresh = ChatCollator(tok, student.image_processor, student.family)(rows + [repeat])
    for key in ("input_ids", "labels", "attention_mask", "pixel_values"):
        assert torch.equal(batch[key], fresh[key]), key
    ids, _, _ = collator.encode(rows[0])
    ids.append(-1)  # callers own what encode returns: the memo is not changed
    assert collator.encode(rows[0])[0] == ids[:-1]
    prompt = collator.encode(rows[0], prompt_only=True)[0]
    assert len(prompt) < len(ids) - 1 and len(collator._text) == len({r["messages"] for r in rows}) + 1


def test_max_length_truncates_answers_but_never_images(setup):
    family, tok, student, collator, rows = setup
    full = collator(rows[1:2])
    n = full["input_ids"].shape[1]
    short = ChatCollator(tok, student.image_processor, family, max_length=n - 3)(rows[1:2])
    assert torch.equal(short["input_ids"], full["input_ids"][:, : n - 3])
    assert torch.equal(short["labels"], full["labels"][:, : n - 3])
    with pytest.raises(RowError, match="row-1: .* truncating would cut its image tokens"):
        ChatCollator(tok, student.image_processor, family, max_length=10)(rows[1:2])


def test_bad_rows_name_their_id(setup):
    _, _, _, collator, rows = setup
    bad_json = dict(rows[0], id="broken", messages="{not json")
    with pytest.raises(RowError, match="^row broken: messages is not valid JSON"):
        collator([bad_json])
    no_image = dict(rows[0], id="imageless", images=[])
    with pytest.raises(RowError, match="^row imageless: messages have 1 image parts but the row has 0 images"):
        collator([no_image])
    not_png = dict(rows[0], id="garbled", images=[b"\x89PNG but not really"])
    with pytest.raises(RowError, match="^row garbled: its image bytes are not a readable image"):
        collator([not_png])
    one_bytes_value = dict(rows[0], id="flat", images=rows[0]["images"][0])
    with pytest.raises(RowError, match="^row flat: 'images' must be a list of encoded images"):
        collator([one_bytes_value])
    unanswered = dict(rows[0], id="open", messages=json.dumps(json.loads(rows[0]["messages"])[:1]))
    with pytest.raises(RowError, match="^row open: messages have no assistant turn"):
        collator([unanswered])
    assert collator([unanswered], prompt_only=True)["input_ids"].shape[0] == 1


def test_text_only_rows(setup):
    _, tok, student, collator, _ = setup
    messages = [
        {"role": "user", "content": [{"type": "text", "text": "Say A."}]},
        {"role": "assistant", "content": [{"type": "text", "text": "A"}]},
    ]
    batch = collator([{"id": "t", "images": [], "messages": json.dumps(messages)}])
    assert "pixel_values" not in batch
    assert batch["labels"][batch["labels"] != IGNORE_INDEX].tolist() == [
        tok.convert_tokens_to_ids("A"),
        tok.convert_tokens_to_ids("<|im_end|>"),
    ]
    with torch.no_grad():
        assert student.forward(batch).logits.shape[:2] == batch["input_ids"].shape


def _vision_grads(student, batch) -> dict[str, float]:
    """Backward from the real positions' log-normalisers; ``name -> max |grad|`` of every vision and
    projector parameter that took part (parameters the model never reads, such as a post-norm the
    feature layer skips, have no gradient)."""
    student.model.zero_grad(set_to_none=True)
    out = student.forward(batch).logits
    out[batch["attention_mask"].bool()].float().logsumexp(-1).sum().backward()
    groups = student.parameter_groups()
    return {n: float(p.grad.abs().max()) for g in ("vision", "projector") for n, p in groups[g] if p.grad is not None}


def test_vision_filler_runs_the_tower_without_changing_the_text_rows(setup):
    """A text-only batch from a ``vision_filler`` collator carries one masked blank image: the real
    positions' inputs, labels and outputs equal the plain batch's, and every vision parameter an image
    batch uses takes part in the graph (zero gradient), which keeps ZeRO ranks in step."""
    family, tok, student, collator, image_rows = setup
    filler = ChatCollator(tok, student.image_processor, family, vision_filler=True)
    rows = [
        {
            "id": f"t{i}",
            "images": [],
            "messages": json.dumps(
                [
                    {"role": "user", "content": [{"type": "text", "text": text}]},
                    {"role": "assistant", "content": [{"type": "text", "text": answer}]},
                ]
            ),
        }
        for i, (text, answer) in enumerate([("Say A.", "A"), (CAPTION + " " + QUESTION, "B")])
    ]
    plain, filled = collator(rows), filler(rows)
    assert "pixel_values" not in plain and "pixel_values" in filled
    width, real = plain["input_ids"].shape[1], plain["attention_mask"].bool()
    image_id = tok.convert_tokens_to_ids(student.spec.image_token)
    placeholders = filled["input_ids"] == image_id
    assert placeholders[0].sum() == IMAGE_TOKENS[family] if family == "qwen2_vl" else placeholders[0].sum() > 0
    assert placeholders[1:].sum() == 0 and not (placeholders & filled["attention_mask"].bool()).any()
    assert (
        torch.equal(filled["attention_mask"][:, :width], plain["attention_mask"])
        and filled["attention_mask"][:, width:].sum() == 0
    )
    assert torch.equal(filled["labels"][:, :width], plain["labels"]) and (filled["labels"][:, width:] == IGNORE_INDEX).all()
    assert torch.equal(filled["input_ids"][real], plain["input_ids"][real])
    assert torch.equal(filler(image_rows)["input_ids"], collator(image_rows)["input_ids"])  # batches with images: unchanged

    with torch.no_grad():
        torch.testing.assert_close(student.forward(filled).logits[:, :width][real], student.forward(plain).logits[real])
    used = _vision_grads(student, collator(image_rows))
    filled_grads = _vision_grads(student, filled)
    assert used and filled_grads.keys() == used.keys() and not any(filled_grads.values())
    assert not _vision_grads(student, plain)
