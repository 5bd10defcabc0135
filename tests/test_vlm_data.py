"""Image-text data for vision-language models: records, rendering and masking, batches, order, the bundled images,
the VLM tokenizers, processors and tiny presets (CPU, offline)."""

import json
import sys
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from fp8coat.train.chunked_loss import can_chunk_loss
from fp8coat.train.data import image_records as records_mod
from fp8coat.train.data.chat_format import chat_format_for, llava_format, qwen2vl_format
from fp8coat.train.data.image_records import IMAGE, ImageTextRecord, load_image_records, record_texts
from fp8coat.train.data.image_sources import load_image_text
from fp8coat.train.data.synthetic_images import (
    BACKGROUND,
    COLOURS,
    DIGIT_WORDS,
    POSITIONS,
    digits_dataset,
    region,
    synthetic_dataset,
    synthetic_scene,
)
from fp8coat.train.data.vlm_batches import (
    batch_rows,
    batch_to,
    collate,
    prepare_image_text,
    train_positions,
)
from fp8coat.train.data.vlm_encode import IGNORE, encode_record, learned_mask
from fp8coat.train.data.vlm_tokenizer import vlm_tokenizer
from fp8coat.train.vlm_loss import vlm_loss
from fp8coat.train.vlm_presets import VLM_PRESETS, build_vlm, preset_family, vlm_config, vlm_processor

TINY = ("tiny-llava", "tiny-qwen2vl")
CONVERSATION = [{"from": "human", "value": "<image>\nWhat is this?"}, {"from": "gpt", "value": "A red square."},
                {"from": "human", "value": "And the count?"}, {"from": "gpt", "value": "Two."}]


def _png(path, colour=(200, 30, 30), size=(40, 40)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    return path


def _write_jsonl(path, lines):
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


@pytest.fixture(scope="module")
def processors():
    """The tiny presets' processors with their byte-level tokenizers (every character one token)."""
    return {name: vlm_processor(name) for name in TINY}


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    """A cache holding 48 synthetic scenes, and their records."""
    cache = tmp_path_factory.mktemp("cache")
    return cache, load_image_text("synthetic:48", cache=cache)


@pytest.fixture
def folder(tmp_path):
    """A folder with captions, a conversation, a system turn and an absolute image path."""
    _png(tmp_path / "img" / "a.png")
    _png(tmp_path / "img" / "b.png", (20, 20, 200), (30, 50))
    absolute = _png(tmp_path / "elsewhere" / "c.png")
    _write_jsonl(tmp_path / "data.jsonl", [
        {"image": "img/a.png", "text": "a red square"},
        "",
        {"image": "img/b.png", "conversations": CONVERSATION, "id": 7},
        {"image": str(absolute), "conversations": [{"from": "system", "value": "Be brief."},
                                                   {"from": "user", "value": "Colour?"},
                                                   {"from": "assistant", "value": "Red."}]},
    ])
    return tmp_path


def _ids(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


# ---- records ---------------------------------------------------------------------------------------------------


def test_records_parse_captions_and_conversations(folder):
    recs = load_image_records(folder)
    assert [r.where for r in recs] == [f"{folder / 'data.jsonl'}:{n}" for n in (1, 3, 4)]
    assert recs[0].caption and recs[0].turns == (("user", IMAGE), ("assistant", "a red square"))
    assert recs[0].image == (folder / "img" / "a.png").resolve()
    assert recs[1].turns == (("user", "<image>\nWhat is this?"), ("assistant", "A red square."),
                             ("user", "And the count?"), ("assistant", "Two."))
    # no <image> in the conversation: put in front of the first human turn, after the system turn
    assert recs[2].turns == (("system", "Be brief."), ("user", "<image>\nColour?"), ("assistant", "Red."))
    assert record_texts(recs) == ["a red square", "What is this?", "A red square.", "And the count?", "Two.",
                                  "Be brief.", "Colour?", "Red."]
    assert load_image_records(folder / "data.jsonl") == recs


def test_folder_without_data_jsonl_reads_every_jsonl_sorted(tmp_path):
    _png(tmp_path / "x.png")
    _write_jsonl(tmp_path / "b.jsonl", [{"image": "x.png", "text": "second"}])
    _write_jsonl(tmp_path / "a.jsonl", [{"image": "x.png", "text": "first"}])
    assert [r.turns[1][1] for r in load_image_records(tmp_path)] == ["first", "second"]
    with pytest.raises(ValueError, match="no data.jsonl or \\*.jsonl"):
        load_image_records(_empty(tmp_path))
    with pytest.raises(FileNotFoundError, match="neither 'synthetic', 'digits'"):
        load_image_records(tmp_path / "missing")


def _empty(tmp_path):
    (tmp_path / "empty").mkdir()
    return tmp_path / "empty"


BAD_RECORDS = [
    ('{"image": "ok.png", "text": ', "not valid JSON"),
    ('["ok.png", "text"]', "must be a JSON object"),
    ({"image": "missing.png", "text": "x"}, "image 'missing.png' not found"),
    ({"image": "garbage.png", "text": "x"}, "image 'garbage.png' cannot be read"),
    ({"image": "truncated.png", "text": "x"}, "image 'truncated.png' cannot be read"),
    ({"image": "ok.png"}, "needs either \"text\" .* or \"conversations\", not neither"),
    ({"image": "ok.png", "text": "x", "conversations": CONVERSATION}, "not both"),
    ({"image": "ok.png", "text": "  "}, "\"text\" must be a non-empty string"),
    ({"text": "x"}, "\"image\" must be a path"),
    ({"image": "ok.png", "conversations": [{"from": "human", "value": "<image>\nHi"}]}, "no assistant"),
    ({"image": "ok.png", "conversations": [{"from": "human", "value": "<image> <image>"},
                                           {"from": "gpt", "value": "x"}]}, "at most once"),
    ({"image": "ok.png", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "x"},
                                           {"from": "human", "value": "<image>"}, {"from": "gpt", "value": "y"}]},
     "in the first human turn"),
    ({"image": "ok.png", "conversations": [{"from": "gpt", "value": "x"}, {"from": "human", "value": "y"},
                                           {"from": "gpt", "value": "z"}]}, "turn 0 is 'assistant'"),
    ({"image": "ok.png", "conversations": [{"from": "robot", "value": "x"}]}, "turn 0 is from \"robot\""),
    ({"image": "ok.png", "conversations": [{"from": "human", "value": "x"}, {"from": "gpt", "value": ""}]},
     "assistant turn 1 is empty"),
    ({"image": "ok.png", "text": "see <image>"}, "must not contain <image>"),
]


@pytest.mark.parametrize("bad,message", BAD_RECORDS)
def test_bad_record_names_file_and_line(tmp_path, bad, message):
    _png(tmp_path / "ok.png")
    (tmp_path / "garbage.png").write_bytes(b"not an image at all")
    good = (tmp_path / "ok.png").read_bytes()
    (tmp_path / "truncated.png").write_bytes(good[:len(good) // 2])
    path = _write_jsonl(tmp_path / "d.jsonl", [{"image": "ok.png", "text": "fine"}, "", bad])
    with pytest.raises((ValueError, FileNotFoundError), match=message) as err:
        load_image_records(path)
    assert str(err.value).startswith(f"{path}:3: ")


# ---- rendering and masking -------------------------------------------------------------------------------------


def _record(tmp_path, conversation=None, caption=None):
    image = _png(tmp_path / "r.png").resolve()
    if caption is not None:
        return ImageTextRecord(image, (("user", IMAGE), ("assistant", caption)), True, "test:1")
    turns = tuple((records_mod._ROLES[t["from"]], t["value"]) for t in conversation)
    return ImageTextRecord(image, turns, False, "test:1")


def test_render_llava_and_qwen2vl(tmp_path):
    rec = _record(tmp_path, CONVERSATION)
    text, spans = llava_format().render(rec)
    assert text == ("USER: <image>\nWhat is this? ASSISTANT: A red square.</s>USER: And the count? ASSISTANT: "
                    "Two.</s>")
    assert [text[s:e] for s, e in spans] == ["A red square.</s>", "Two.</s>"]
    text, spans = qwen2vl_format().render(rec)
    assert text == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
                    "<|vision_start|><|image_pad|><|vision_end|>\nWhat is this?<|im_end|>\n<|im_start|>assistant\n"
                    "A red square.<|im_end|>\n<|im_start|>user\nAnd the count?<|im_end|>\n<|im_start|>assistant\n"
                    "Two.<|im_end|>\n")
    assert [text[s:e] for s, e in spans] == ["A red square.<|im_end|>", "Two.<|im_end|>"]
    text, spans = qwen2vl_format().render(_record(tmp_path, caption="a cat"))
    assert text == "<|vision_start|><|image_pad|><|vision_end|>a cat<|endoftext|>"
    assert [text[s:e] for s, e in spans] == ["a cat<|endoftext|>"]


@pytest.mark.parametrize("name", TINY)
def test_chat_template_writes_the_training_text(tmp_path, processors, name):
    processor = processors[name]
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]},
                {"role": "assistant", "content": [{"type": "text", "text": "A red square."}]},
                {"role": "user", "content": "And the count?"}, {"role": "assistant", "content": "Two."}]
    text, _ = chat_format_for(processor).render(_record(tmp_path, CONVERSATION))
    assert processor.apply_chat_template(messages, tokenize=False) == text
    prompt = processor.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
    assert text.startswith(prompt)


def test_learned_mask_rules():
    spans = ((5, 9),)
    assert learned_mask([(0, 0), (0, 5), (4, 6), (6, 9), (9, 12), (5, 5), (9, 9)], spans) == \
        [False, False, True, True, False, True, False]


def test_llava_masking_exact(tmp_path, processors):
    """Byte-level tokenizer: the expected ids and labels written out piece by piece."""
    processor = processors["tiny-llava"]
    tok = processor.tokenizer
    bos, eos, image = tok.bos_token_id, tok.eos_token_id, tok.convert_tokens_to_ids("<image>")
    ex = encode_record(_record(tmp_path, CONVERSATION), processor, chat_format_for(processor))
    pieces = [([bos], False), (_ids(tok, "USER: "), False), ([image] * 16, False),
              (_ids(tok, "\nWhat is this? ASSISTANT: "), False), (_ids(tok, "A red square.") + [eos], True),
              (_ids(tok, "USER: And the count? ASSISTANT: "), False), (_ids(tok, "Two.") + [eos], True)]
    ids = [t for p, _ in pieces for t in p]
    labels = [t if learned else IGNORE for p, learned in pieces for t in p]
    assert ex.tokens["input_ids"].tolist() == ids
    assert ex.tokens["labels"].tolist() == labels
    assert ex.tokens["attention_mask"].tolist() == [1] * len(ids)
    assert ex.n_image_tokens == 16 and ex.prompt_len == next(i for i, t in enumerate(labels) if t != IGNORE)
    assert ex.vision["pixel_values"].shape == (1, 3, 32, 32)


def test_qwen2vl_masking_exact(tmp_path, processors):
    processor = processors["tiny-qwen2vl"]
    tok = processor.tokenizer
    pad = tok.convert_tokens_to_ids("<|image_pad|>")
    ex = encode_record(_record(tmp_path, CONVERSATION), processor, chat_format_for(processor))
    pieces = [(_ids(tok, "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
                         "<|vision_start|>"), False), ([pad] * 16, False),
              (_ids(tok, "<|vision_end|>\nWhat is this?<|im_end|>\n<|im_start|>assistant\n"), False),
              (_ids(tok, "A red square.<|im_end|>"), True),
              (_ids(tok, "\n<|im_start|>user\nAnd the count?<|im_end|>\n<|im_start|>assistant\n"), False),
              (_ids(tok, "Two.<|im_end|>"), True), (_ids(tok, "\n"), False)]
    ids = [t for p, _ in pieces for t in p]
    assert ex.tokens["input_ids"].tolist() == ids
    assert ex.tokens["labels"].tolist() == [t if learned else IGNORE for p, learned in pieces for t in p]
    assert ex.tokens["mm_token_type_ids"].tolist() == [int(t == pad) for t in ids]
    assert ex.vision["image_grid_thw"].tolist() == [[1, 8, 8]]  # (32 / 4)² patches, merged 2 × 2 into 16 tokens
    assert ex.vision["pixel_values"].shape == (64, 3 * 2 * 4 * 4)


@pytest.mark.parametrize("name", TINY)
def test_masking_with_merged_tokens(tmp_path, synthetic, name):
    """A BPE with merges: learned tokens are exactly those overlapping the answers (for LLaVA the token " A" holds
    the space before the answer); together they spell them."""
    cache, recs = synthetic
    rec = _record(tmp_path, CONVERSATION)
    texts = record_texts(recs) + [llava_format().render(rec).text, qwen2vl_format().render(rec).text] * 3
    tok = vlm_tokenizer(preset_family(name), texts, vocab_size=400, cache=cache)
    processor = vlm_processor(name, tok)
    fmt = chat_format_for(processor)
    ex = encode_record(rec, processor, fmt)
    ids, labels = ex.tokens["input_ids"].tolist(), ex.tokens["labels"].tolist()
    assert len(ids) < len(encode_record(rec, vlm_processor(name), fmt).tokens["input_ids"])  # merges happened
    assert all(label in (IGNORE, t) for t, label in zip(ids, labels))
    runs, run = [], []
    for t, label in zip(ids, labels):
        if label != IGNORE:
            run.append(t)
        elif run:
            runs, run = [*runs, run], []
    runs += [run] if run else []
    if name == "tiny-llava":
        assert " A" in {tok.decode([t]) for t in ids}
        assert [tok.decode(r) for r in runs] == [" A red square.</s>", "Two.</s>"]  # " Two" is not a token
    else:
        assert [tok.decode(r) for r in runs] == ["A red square.<|im_end|>", "Two.<|im_end|>"]
    bos = "<s>" if name == "tiny-llava" else ""
    assert tok.decode(ids) == bos + fmt.render(rec).text.replace(fmt.image_token, fmt.image_token * 16)
    assert ids.count(processor.image_token_id) == 16
    assert all(labels[i] == IGNORE for i, t in enumerate(ids) if t == processor.image_token_id)


def test_processor_error_names_the_record(tmp_path, processors):
    _png(tmp_path / "thin.png", size=(600, 2))  # an aspect ratio Qwen2-VL's image processor refuses
    path = _write_jsonl(tmp_path / "d.jsonl", [{"image": "thin.png", "text": "a line"}])
    rec, = load_image_records(path)
    processor = processors["tiny-qwen2vl"]
    with pytest.raises(ValueError, match=f"^{path}:1: Qwen2VLImageOnlyProcessor failed on this record: .*aspect"):
        encode_record(rec, processor, chat_format_for(processor))


def test_processor_without_image_token_is_refused():
    with pytest.raises(ValueError, match="has no image_token"):
        chat_format_for(types.SimpleNamespace(tokenizer=None))


# ---- batches ---------------------------------------------------------------------------------------------------


def _data(recs, processor, seq_len=None, seed=0, val_fraction=0.25):
    return prepare_image_text(recs, processor, seq_len=seq_len, val_fraction=val_fraction, seed=seed)


@pytest.mark.parametrize("name", TINY)
def test_padding_to_longest_and_image_tokens(folder, processors, name):
    processor = processors[name]
    recs = load_image_records(folder)
    examples = [encode_record(r, processor, chat_format_for(processor)) for r in recs]
    batch = collate(examples, pad_id=processor.tokenizer.pad_token_id)
    lengths = [len(ex) for ex in examples]
    assert batch["input_ids"].shape == (3, max(lengths)) and len(set(lengths)) == 3
    for row, ex in enumerate(examples):
        n = len(ex)
        for key in ex.tokens:
            assert torch.equal(batch[key][row, :n], ex.tokens[key])
        assert (batch["input_ids"][row, n:] == processor.tokenizer.pad_token_id).all()
        assert (batch["attention_mask"][row, n:] == 0).all() and (batch["labels"][row, n:] == IGNORE).all()
    image_tokens = (batch["input_ids"] == processor.image_token_id).sum(-1).tolist()
    if name == "tiny-llava":  # every image resized and cropped to 32 × 32: (32 / 8)² tokens
        assert batch["pixel_values"].shape == (3, 3, 32, 32) and image_tokens == [16, 16, 16]
    else:  # the 30 × 50 (w × h) image becomes about 32² pixels in multiples of 8: 24 × 40 -> 6 × 10 patches
        assert batch["image_grid_thw"].tolist() == [[1, 8, 8], [1, 10, 6], [1, 8, 8]]
        assert batch["pixel_values"].shape == (64 + 60 + 64, 96) and image_tokens == [16, 15, 16]
        assert (batch["image_grid_thw"].prod(-1) // 4).tolist() == image_tokens
        assert (batch["mm_token_type_ids"] == (batch["input_ids"] == processor.image_token_id)).all()
    assert {k: v.dtype for k, v in batch.items()} == {
        k: torch.float32 if k == "pixel_values" else torch.int64 for k in batch}


@pytest.mark.parametrize("name", TINY)
def test_fixed_seq_len_truncates_after_the_prompt_only(folder, processors, name):
    processor = processors[name]
    recs = load_image_records(folder)
    examples = [encode_record(r, processor, chat_format_for(processor)) for r in recs]
    cut = max(ex.prompt_len for ex in examples) + 3
    conv = examples[1]
    assert len(conv) > cut
    batch = collate(examples, processor.tokenizer.pad_token_id, seq_len=cut)
    assert batch["input_ids"].shape == (3, cut)
    assert torch.equal(batch["input_ids"][1], conv.tokens["input_ids"][:cut])
    assert torch.equal(batch["labels"][1], conv.tokens["labels"][:cut])
    assert int((batch["labels"][1] != IGNORE).sum()) == cut - conv.prompt_len
    longest = max(range(3), key=lambda i: examples[i].prompt_len)
    ex = examples[longest]
    with pytest.raises(ValueError, match=f"^{recs[longest].where}: the image \\({ex.n_image_tokens} tokens\\) and the "
                                         f"prompt take {ex.prompt_len} tokens .* seq_len {ex.prompt_len}"):
        collate(examples, processor.tokenizer.pad_token_id, seq_len=ex.prompt_len)
    collate(examples, processor.tokenizer.pad_token_id, seq_len=ex.prompt_len + 1)  # one answer token: fits


def test_split_order_and_resume(synthetic, processors):
    _, recs = synthetic
    processor = processors["tiny-llava"]
    a, b = _data(recs, processor, seed=3), _data(recs, processor, seed=3)
    c = _data(recs, processor, seed=4)
    assert a.train == b.train and a.val == b.val and a.val != c.val
    assert len(a.val) == 12 and len(a.train) == 36 and set(a.train).isdisjoint(a.val)
    assert set(a.train) | set(a.val) == set(recs)
    # every epoch visits each training record once; epochs differ; positions depend only on (seed, position)
    pos = train_positions(36, seed=3, start=0, count=36 * 3)
    assert all(sorted(pos[e * 36:(e + 1) * 36]) == list(range(36)) for e in range(3))
    assert not np.array_equal(pos[:36], pos[36:72])
    assert np.array_equal(train_positions(36, 3, 50, 20), pos[50:70])
    assert not np.array_equal(train_positions(36, 4, 0, 36), pos[:36])
    # batches: same seed, same stream; start_step=k resumes it exactly (across an epoch boundary: 5 × 8 > 36)
    first = [x for _, x in zip(range(6), a.train_batches(8))]
    again = [x for _, x in zip(range(6), b.train_batches(8))]
    resumed = [x for _, x in zip(range(2), a.train_batches(8, start_step=4))]
    for x, y in zip(first, again):
        assert all(torch.equal(x[k], y[k]) for k in x)
    for x, y in zip(first[4:], resumed):
        assert all(torch.equal(x[k], y[k]) for k in x)
    expected = a.encode([a.train[i] for i in pos[40:48]])
    assert all(torch.equal(first[5][k], expected[k]) for k in expected)


def test_train_batches_with_workers_are_the_same(synthetic, processors):
    _, recs = synthetic
    data = _data(recs, processors["tiny-qwen2vl"], seed=1)
    plain = [x for _, x in zip(range(5), data.train_batches(6, start_step=2))]
    ahead = [x for _, x in zip(range(5), data.train_batches(6, start_step=2, workers=2))]
    for x, y in zip(plain, ahead):
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
    assert all(torch.equal(plain[1][k], v) for k, v in data.train_batch(6, 3).items())


def test_val_batches_fixed_and_evenly_spaced(synthetic, processors):
    _, recs = synthetic
    data = _data(recs, processors["tiny-qwen2vl"], seq_len=40, val_fraction=0.1)  # 5 validation records
    assert len(data.val) == 5
    one, two = data.val_batches(2, 4), data.val_batches(2, 4)
    assert len(one) == 4 and all(torch.equal(x[k], y[k]) for x, y in zip(one, two) for k in x)
    idx = [0, 1, 1, 2, 2, 3, 3, 4]  # rint(linspace(0, 4, 8))
    for b, batch in enumerate(one):
        expected = data.encode([data.val[i] for i in idx[2 * b:2 * b + 2]])
        assert all(torch.equal(batch[k], expected[k]) for k in expected)
        assert batch["input_ids"].shape == (2, 40)
    with pytest.raises(ValueError, match="at least 2 records"):
        _data(recs[:1], processors["tiny-llava"])


def test_batch_rows_and_batch_to(synthetic, processors):
    _, recs = synthetic
    for name in TINY:
        data = _data(recs, processors[name])
        batch = data.encode(data.train[:4])
        part = batch_rows(batch, 1, 3)
        expected = data.encode(data.train[1:3])
        width = expected["input_ids"].shape[1]
        for key, value in expected.items():
            got = part[key][:, :width] if value.dim() == 2 and key != "pixel_values" else part[key]
            assert torch.equal(got, value), key
        moved = batch_to(batch, "cpu", torch.bfloat16)
        assert moved["pixel_values"].dtype == torch.bfloat16 and moved["input_ids"].dtype == torch.int64


# ---- bundled images --------------------------------------------------------------------------------------------


def _components(mask: np.ndarray) -> list[np.ndarray]:
    """8-connected components of a boolean mask, each as an array of (y, x)."""
    seen = np.zeros_like(mask)
    out = []
    for y, x in zip(*np.nonzero(mask)):
        if seen[y, x]:
            continue
        stack, pixels = [(y, x)], []
        seen[y, x] = True
        while stack:
            cy, cx = stack.pop()
            pixels.append((cy, cx))
            for dy in (-1, 0, 1):
                for dx in (-1, 0, 1):
                    ny, nx = cy + dy, cx + dx
                    if 0 <= ny < mask.shape[0] and 0 <= nx < mask.shape[1] and mask[ny, nx] and not seen[ny, nx]:
                        seen[ny, nx] = True
                        stack.append((ny, nx))
        out.append(np.array(pixels))
    return out


def _parse_caption(caption: str):
    words = caption.split()
    count = ("one", "two", "three", "four").index(words[0]) + 1
    shape = words[2].removesuffix("s")
    position = {"left": "left", "right": "right", "top": "top", "bottom": "bottom", "center": "center"}[words[-1]]
    return count, words[1], shape, position


def test_synthetic_captions_match_the_pixels():
    seen = set()
    for i in range(80):
        image, caption, _ = synthetic_scene(i, seed=5, size=64)
        count, colour, shape, position = _parse_caption(caption)
        seen.add((shape, position))
        pixels = np.asarray(image)
        painted = (pixels != BACKGROUND).any(-1)
        assert (pixels[painted] == COLOURS[colour]).all()  # one colour, the caption's, no anti-aliasing
        x0, y0, x1, y1 = region(position, 64)
        inside = np.zeros_like(painted)
        inside[y0:y1, x0:x1] = True
        assert painted.any() and not (painted & ~inside).any()  # every shape in the captioned region
        parts = _components(painted)
        assert len(parts) == count
        for part in parts:
            h = part[:, 0].max() - part[:, 0].min() + 1
            w = part[:, 1].max() - part[:, 1].min() + 1
            fill = len(part) / (h * w)
            expected = {"square": (0.99, 1.0), "circle": (0.65, 0.9), "triangle": (0.4, 0.64)}[shape]
            assert expected[0] <= fill <= expected[1], (i, caption, fill)
    assert {p for _, p in seen} == set(POSITIONS) and len(seen) >= 12


def test_synthetic_scenes_are_deterministic():
    a, cap_a, _ = synthetic_scene(7, seed=1)
    b, cap_b, _ = synthetic_scene(7, seed=1)
    assert cap_a == cap_b and a.tobytes() == b.tobytes()
    others = [synthetic_scene(7, seed=2), synthetic_scene(8, seed=1)]
    assert all(o[0].tobytes() != a.tobytes() for o in others)


def test_synthetic_dataset_is_written_once(tmp_path):
    folder = synthetic_dataset(6, seed=0, size=48, cache=tmp_path)
    assert folder == tmp_path / "images" / "synthetic-n6-s48-seed0-v1"
    assert sorted(p.name for p in folder.iterdir()) == ["data.jsonl", "images", "manifest.json"]
    stamp = (folder / "data.jsonl").stat().st_mtime_ns
    assert synthetic_dataset(6, seed=0, size=48, cache=tmp_path) == folder
    assert (folder / "data.jsonl").stat().st_mtime_ns == stamp
    recs = load_image_records(folder)
    for i, rec in enumerate(recs):
        image, caption, _ = synthetic_scene(i, seed=0, size=48)
        assert rec.turns[1][1] == caption
        assert np.array_equal(np.asarray(Image.open(rec.image).convert("RGB")), np.asarray(image))
    assert load_image_text("synthetic:6", cache=tmp_path) != recs  # the default size (64) is another dataset
    with pytest.raises(ValueError, match="synthetic:N"):
        load_image_text("synthetic:x", cache=tmp_path)


def _fake_sklearn(monkeypatch, images, targets):
    datasets = types.ModuleType("sklearn.datasets")
    datasets.load_digits = lambda: types.SimpleNamespace(images=images, target=targets)
    sklearn = types.ModuleType("sklearn")
    sklearn.datasets = datasets
    monkeypatch.setitem(sys.modules, "sklearn", sklearn)
    monkeypatch.setitem(sys.modules, "sklearn.datasets", datasets)


def test_digits_from_a_fake_load_digits(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 17, size=(4, 8, 8)).astype(np.float64)
    _fake_sklearn(monkeypatch, images, np.array([7, 0, 3, 9]))
    recs = load_image_text("digits", cache=tmp_path)
    assert [r.turns[1][1] for r in recs] == [f"the digit {DIGIT_WORDS[d]}" for d in (7, 0, 3, 9)]
    for rec, pixels in zip(recs, images):
        with Image.open(rec.image) as im:
            assert im.mode == "L" and im.size == (8, 8)
            assert np.array_equal(np.asarray(im), (255 - pixels * 255 / 16).round().astype(np.uint8))
    assert digits_dataset(tmp_path) == recs[0].image.parent.parent


def test_digits_without_scikit_learn_says_so(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn", None)
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    with pytest.raises(ModuleNotFoundError, match="scikit-learn is not installed: pip install scikit-learn"):
        load_image_text("digits", cache=tmp_path)


def test_digits_with_scikit_learn(tmp_path):
    pytest.importorskip("sklearn", reason="scikit-learn is not installed: the 'digits' images come from it")
    recs = load_image_text("digits", cache=tmp_path)
    assert len(recs) == 1797 and recs[0].turns[1][1] == "the digit zero"


# ---- tokenizers, processors, presets ----------------------------------------------------------------------------


def test_vlm_tokenizers(tmp_path):
    llava, qwen = vlm_tokenizer("llava"), vlm_tokenizer("qwen2-vl")
    assert [llava.convert_tokens_to_ids(t) for t in ("<unk>", "<s>", "</s>", "<pad>", "<image>")] == [0, 1, 2, 3, 4]
    assert len(llava) == 5 + 256 and len(qwen) == 7 + 256
    assert llava("ab")["input_ids"] == [1, *_ids(llava, "ab")] and qwen("ab")["input_ids"] == _ids(qwen, "ab")
    assert _ids(qwen, "<|im_start|>x<|image_pad|>") == [1, _ids(qwen, "x")[0], 5]
    texts = ["two red circles on the left", "one blue square at the top"] * 20
    trained = vlm_tokenizer("llava", texts, vocab_size=300, cache=tmp_path)
    assert 261 < len(trained) <= 300 and len(_ids(trained, texts[0])) < len(texts[0])
    assert [p.name.startswith("vlm-llava-bpe300-") for p in (tmp_path / "tokenizers").iterdir()] == [True]
    assert vlm_tokenizer("llava", texts, vocab_size=300, cache=tmp_path).get_vocab() == trained.get_vocab()
    with pytest.raises(ValueError, match="unknown VLM family"):
        vlm_tokenizer("blip")


@pytest.mark.parametrize("name", ["llava-100m", "qwen2vl-100m"])
def test_100m_presets_shape(name):
    processor = vlm_processor(name)
    cfg = vlm_config(name, processor.tokenizer)
    import transformers

    with torch.device("meta"):
        model = transformers.AutoModelForImageTextToText.from_config(cfg)
    hidden = cfg.text_config.hidden_size
    n = sum(p.numel() for p in model.parameters()) + 2 * hidden * (4096 - len(processor.tokenizer))
    assert 95e6 < n < 110e6  # with a 4096-token vocabulary
    out = processor(images=[Image.new("RGB", (300, 200), (9, 9, 9))], text=[chat_format_for(processor).image],
                    return_tensors="pt")
    tokens = int((out["input_ids"] == processor.image_token_id).sum())
    if name == "llava-100m":
        assert out["pixel_values"].shape == (1, 3, 224, 224) and tokens == 256 == cfg.image_seq_length
    else:  # 300 × 200 keeps its aspect ratio within 224² pixels, sides in multiples of 28: 252 × 168
        assert out["image_grid_thw"].tolist() == [[1, 12, 18]] and tokens == 12 * 18 // 4


@pytest.mark.parametrize("name", TINY)
def test_tiny_preset_forward_backward(synthetic, name):
    cache, recs = synthetic
    tok = vlm_tokenizer(preset_family(name), record_texts(recs), vocab_size=320, cache=cache)
    model, processor = build_vlm(name, tok, dtype=torch.float32, seed=0)
    assert model.config.image_token_id == processor.image_token_id == tok.convert_tokens_to_ids(
        chat_format_for(processor).image_token)
    assert model.get_input_embeddings().weight.shape[0] == len(tok)
    data = prepare_image_text(recs, processor, seq_len=None, val_fraction=0.25, seed=0)
    batch = next(data.train_batches(4))
    out = model(**batch)
    assert torch.isfinite(out.loss)
    # labels are not shifted: the model predicts labels[:, 1:] from the logits at [:, :-1]
    manual = F.cross_entropy(out.logits[:, :-1].reshape(-1, out.logits.shape[-1]).float(),
                             batch["labels"][:, 1:].reshape(-1), ignore_index=IGNORE)
    torch.testing.assert_close(out.loss, manual)
    out.loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert len(grads) > 0.9 * len(list(model.parameters())) and all(torch.isfinite(g).all() for g in grads)
    assert model.get_input_embeddings().weight.grad.abs().sum() > 0
    vision = model.model.vision_tower if name == "tiny-llava" else model.model.visual
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in vision.parameters())
    # bf16 parameters and inputs, as the trainer runs them
    model_bf16, _ = build_vlm(name, tok, dtype=torch.bfloat16, seed=0)
    loss = model_bf16(**batch_to(batch, "cpu", torch.bfloat16)).loss
    assert torch.isfinite(loss) and abs(loss.item() - out.loss.item()) < 0.1


@pytest.mark.parametrize("name", TINY)
def test_vlm_loss_chunked_and_plain(synthetic, processors, name):
    _, recs = synthetic
    model, processor = build_vlm(name, seed=0)
    data = _data(recs, processor)
    batch = data.encode(data.train[:3])
    hf = model(**batch).loss
    plain = vlm_loss(model, batch, chunked=False)
    assert can_chunk_loss(model)
    chunked = vlm_loss(model, batch, chunked=True)
    torch.testing.assert_close(plain, hf)
    torch.testing.assert_close(chunked, hf)
    chunked.backward()
    head = model.lm_head.weight.grad.clone()
    model.zero_grad()
    hf.backward()
    torch.testing.assert_close(head, model.lm_head.weight.grad)


@pytest.mark.parametrize("name", TINY)
def test_processor_save_and_load(tmp_path, processors, name):
    processor = processors[name]
    processor.save_pretrained(tmp_path)
    loaded = type(processor).from_pretrained(tmp_path)
    assert type(loaded.image_processor) is type(processor.image_processor)
    assert loaded.chat_template == processor.chat_template and loaded.image_token_id == processor.image_token_id
    image = Image.new("RGB", (50, 40), (10, 200, 30))
    text = chat_format_for(processor).image + "hi"
    a, b = (p(images=[image], text=[text], return_tensors="pt") for p in (processor, loaded))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_build_vlm_is_seeded():
    a, _ = build_vlm("tiny-qwen2vl", seed=1)
    b, _ = build_vlm("tiny-qwen2vl", seed=1)
    c, _ = build_vlm("tiny-qwen2vl", seed=2)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)
    assert set(VLM_PRESETS) == {"tiny-llava", "llava-100m", "tiny-qwen2vl", "qwen2vl-100m"}
    with pytest.raises(ValueError, match="unknown VLM preset"):
        build_vlm("tiny")


@pytest.mark.parametrize("where", ["config", "text_config"])
@pytest.mark.parametrize("field,value", [("final_logit_softcapping", 30.0), ("logit_scale", 0.5)])
def test_chunked_loss_refused_where_logits_are_changed_before_the_loss(where, field, value):
    """A model whose config (or, for a vision-language model, whose language model's config) soft-caps or scales
    the logits is not chunked: the chunked loss takes the LM head's output as the logits. A bias in the head, or a
    head that is no plain linear, is not chunked either."""
    model, _ = build_vlm("tiny-llava", seed=0)
    assert can_chunk_loss(model)
    config = model.config if where == "config" else model.config.text_config
    setattr(config, field, value)
    assert not can_chunk_loss(model)
    setattr(config, field, None)
    model.lm_head.bias = torch.nn.Parameter(torch.zeros(model.lm_head.out_features))
    assert not can_chunk_loss(model)
