"""The reference runtime on the tiny judges (real architecture, real tokenizer, random weights)."""

import numpy as np
import pytest
import torch
from PIL import Image

from dfj import prompts
from dfj.data import read_split

pytestmark = pytest.mark.slow

MAX_NEW = 24


@pytest.fixture(scope="module")
def point(tiny, judges):
    return judges(tiny("pointwise"), max_new_tokens=MAX_NEW)


@pytest.fixture(scope="module")
def records(tiny_split):
    return read_split(tiny_split("pointwise", 10)).records


def test_same_output_for_path_bytes_and_pil(point, records):
    record = records[0]
    with open(record.image, "rb") as handle:
        data = handle.read()
    outputs = [point.score(image, record.label, record.response).text for image in (record.image, data, Image.open(record.image))]
    assert outputs[0] and outputs[0] == outputs[1] == outputs[2]
    cont = "<reasoning>x</reasoning>\n<score>3</score>"
    lps = [point.logprobs(image, record.label, record.response, continuation=cont) for image in (record.image, data)]
    assert np.array_equal(lps[0], lps[1])


def test_the_image_and_the_prompt_change_the_output(point, records):
    a, b = records[0], records[5]  # different images
    assert a.image != b.image
    cont = "<reasoning>x</reasoning>\n<score>3</score>"
    base = point.logprobs(a.image, a.label, a.response, continuation=cont)
    other_image = point.logprobs(b.image, a.label, a.response, continuation=cont)
    other_label = point.logprobs(a.image, "real" if a.label != "real" else "fake", a.response, continuation=cont)
    assert np.abs(base - other_image).max() > 1e-3
    assert np.abs(base - other_label).max() > 1e-3
    texts = {point.score(r.image, r.label, r.response).text for r in records[:10:3]}
    assert len(texts) > 1  # greedy output is input-dependent, so output-equality tests can fail


def test_logprobs_are_teacher_forced_and_consistent_with_greedy(point, records):
    from dfj.runtime.base import Scoring

    record = records[1]
    runtime = point.runtime
    prompt = point._prepare(record.image, record.label, record.responses()).prompt
    ids = runtime.generate([prompt], MAX_NEW)[0]
    lp = runtime.score([prompt], [Scoring(tuple(ids), full=True)])[0].rows
    vocab = runtime.model.config.text_config.vocab_size
    assert lp.shape == (len(ids), vocab) and lp.dtype == np.float32
    np.testing.assert_allclose(np.exp(lp).sum(-1), 1.0, atol=1e-4)
    # Greedy decoding picked the argmax at every step; teacher forcing the same ids must agree.
    assert lp.argmax(-1).tolist() == ids
    text = point.score(record.image, record.label, record.response).text
    assert text == runtime.decode(ids)
    assert point.logprobs(record.image, record.label, record.response, continuation=text).shape[1] == vocab


def test_every_processor_output_reaches_the_model(point, records):
    """M-RoPE needs mm_token_type_ids; without it transformers 5 silently uses 1-D positions."""
    record = records[2]
    runtime = point.runtime
    prompt = point._prepare(record.image, record.label, record.responses()).prompt
    inputs = runtime.encode_ids(prompt.image, prompt.ids)
    assert {"input_ids", "attention_mask", "pixel_values", "image_grid_thw", "mm_token_type_ids"} <= set(inputs)
    with torch.inference_mode():
        full = runtime.model(**inputs, logits_to_keep=1).logits[0, -1]
        partial = {k: v for k, v in inputs.items() if k != "mm_token_type_ids"}
        without = runtime.model(**partial, logits_to_keep=1).logits[0, -1]
    lp = point.logprobs(record.image, record.label, record.response, continuation="<score>")  # row 0: the first token
    np.testing.assert_allclose(lp[0], torch.log_softmax(full.float(), -1).numpy(), atol=1e-5)
    assert (full - without).abs().max() > 1e-3


def test_images_are_resized_with_the_training_limits(tiny, judges):
    judge = judges(tiny("pointwise"), max_new_tokens=MAX_NEW)
    size = judge.runtime.processor.image_processor.size
    assert (size["shortest_edge"], size["longest_edge"]) == (3136, 1003520)
    big = Image.new("RGB", (2000, 1500), (5, 6, 7))
    grid = judge.runtime.chat.encode(big, prompts.render_chat("Describe the image."))["image_grid_thw"][0].tolist()
    from dfj.images import smart_resize

    h, w = smart_resize(1500, 2000)
    assert grid == [1, h // 14, w // 14] and h * w <= 1003520


def test_reference_decoding_limits(tiny, judges):
    assert judges(tiny("pointwise")).new_token_limit == 512
    assert judges(tiny("pairwise")).new_token_limit == 128


def test_pairwise_batch(tiny, judges, tiny_split):
    judge = judges(tiny("pairwise"), max_new_tokens=MAX_NEW)
    split = read_split(tiny_split("pairwise", 20))
    batch = split.records[:3] + [{"image": b"", "label": "fake", "response_a": "a", "response_b": "b"}]
    verdicts = judge.compare_many(batch)
    assert len(verdicts) == 4
    assert all(v.text for v in verdicts[:3])
    assert "record 3" in verdicts[3].error and "empty" in verdicts[3].error
    single = judge.compare(split.records[0].image, split.records[0].label, split.records[0].response_a, split.records[0].response_b)
    assert single.text == verdicts[0].text
