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
    prompt = point.prompt(record.image, record.label, *record.responses())
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
    prompt = point.prompt(record.image, record.label, *record.responses())
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


# -- oneDNN-packed linear layers (dfj.runtime.torch_packed) ------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_packed_linear_layer_computes_what_torch_linear_computes(dtype):
    from dfj.runtime.torch_packed import PackedLinear

    if dtype == torch.bfloat16 and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        pytest.skip("oneDNN has no bfloat16 kernels on this CPU")
    torch.manual_seed(0)
    linear = torch.nn.Linear(96, 200, bias=True).to(dtype)
    packed = PackedLinear(linear)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    with torch.inference_mode():
        for shape in [(1, 96), (5, 96), (2, 7, 96)]:  # a decode step, a group's step, a padded prefill
            x = torch.randn(*shape).to(dtype)
            expected, got = linear(x).float(), packed(x).float()
            assert got.shape == expected.shape
            torch.testing.assert_close(got, expected, atol=tol, rtol=tol)
        with pytest.raises(TypeError, match="got torch.float16 input"):
            packed(torch.randn(1, 96, dtype=torch.float16))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_packed_patch_embedding_computes_what_the_conv3d_computes(dtype):
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionPatchEmbed

    from dfj.runtime.torch_packed import PackedPatchEmbed

    torch.manual_seed(0)
    conv = Qwen2_5_VisionPatchEmbed(patch_size=14, temporal_patch_size=2, in_channels=3, embed_dim=64).to(dtype).eval()
    patches = torch.randn(37, 3 * 2 * 14 * 14)  # as the processor gives them: float32, flattened
    with torch.inference_mode():
        expected, got = conv(patches), PackedPatchEmbed(conv)(patches)
    assert got.shape == expected.shape == (37, 64) and got.dtype == expected.dtype == dtype
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    assert (got.float() - expected.float()).abs().max() <= tolerance * expected.float().abs().max()


def test_a_merged_judge_on_cpu_is_packed_and_judges_as_the_plain_model(tiny, judges, records):
    from dfj.runtime.base import Scoring

    packed, plain = judges(tiny("pointwise"), max_new_tokens=MAX_NEW), judges(tiny("pointwise"), max_new_tokens=MAX_NEW, pack_weights=False)
    # Every linear layer of the text model, the head and the vision tower: none left unpacked.
    assert packed.runtime.describe()["packed_linears"] > 0 and plain.runtime.describe()["packed_linears"] == 0
    assert not [name for name, m in packed.runtime.model.named_modules() if type(m) in (torch.nn.Linear, torch.nn.Conv3d)]
    group = [packed.prompt(r.image, r.label, *r.responses()) for r in records[:5]]
    [seen_packed], [seen_plain] = packed.runtime.embed_images(group[:1]), plain.runtime.embed_images(group[:1])
    assert np.abs(np.asarray(seen_packed) - np.asarray(seen_plain)).max() < 1e-4
    assert packed.runtime.generate(group, MAX_NEW) == plain.runtime.generate(group, MAX_NEW)
    ids = plain.runtime.generate(group[:1], MAX_NEW)[0]
    a, b = (j.runtime.score(group[:1], [Scoring(tuple(ids), full=True)])[0].rows for j in (packed, plain))
    assert np.abs(a - b).max() < 1e-4


def test_weight_packing_is_refused_where_it_cannot_apply_and_skipped_by_default(tiny):
    import dfj

    with pytest.raises(ValueError, match="unmerged adapter"):
        dfj.load_judge(str(tiny("pointwise", adapter=True)), pack_weights=True)
    assert dfj.load_judge(str(tiny("pointwise", adapter=True))).runtime.describe()["packed_linears"] == 0
    with pytest.raises(ValueError, match="float32 or bfloat16 models, not torch.float16"):
        dfj.load_judge(str(tiny("pointwise")), dtype="float16", pack_weights=True)
    with pytest.raises(ValueError, match="pack_weights must be True, False or None"):
        dfj.load_judge(str(tiny("pointwise")), pack_weights="yes")


def test_the_reserving_kv_layer_holds_what_a_dynamic_layer_holds_and_appends_in_place():
    import copy

    from transformers.cache_utils import DynamicLayer

    from dfj.runtime.torch_cache import RESERVE, ReservingLayer

    torch.manual_seed(0)
    plain, reserving = DynamicLayer(), ReservingLayer()

    def step(n: int, rows: int = 1):
        k, v = torch.randn(rows, 2, n, 8), torch.randn(rows, 2, n, 8)
        expected, got = plain.update(k, v), reserving.update(k, v)
        for a, b in zip(expected, got):
            assert torch.equal(a, b)

    step(7)  # a prompt head
    storage = reserving.keys.untyped_storage().data_ptr()
    for _ in range(5):  # decode steps write into the same buffer
        step(1)
    assert reserving.keys.untyped_storage().data_ptr() == storage and reserving.get_seq_length() == 12
    for layer in (plain, reserving):  # the previous record's tail is dropped, then overwritten
        layer.crop(-3)
    step(2)
    copied = copy.deepcopy(reserving)
    assert torch.equal(copied.keys, reserving.keys)
    for layer in (plain, reserving):
        layer.batch_repeat_interleave(3)
    step(1, rows=3)  # new buffers for the repeated rows; the copy is untouched
    for _ in range(RESERVE + 1):  # past the reserve: a larger buffer, same contents
        step(1, rows=3)
    assert copied.get_seq_length() == 11 and reserving.get_seq_length() == 11 + 1 + RESERVE + 1


def test_a_processor_is_read_once_per_content_and_each_caller_gets_its_own_image_processor(tiny, tmp_path):
    """Every artifact of a judge carries the same tokenizer files; an export and its probes read them a
    dozen times. The cache keys on their content, never on the folder, and never shares pixel limits."""
    import shutil

    from dfj import hf

    source = tiny("pairwise")
    copy = tmp_path / "copy"
    shutil.copytree(source, copy)
    first, second = hf.load_processor(source), hf.load_processor(copy)
    assert first.tokenizer is second.tokenizer and first.image_processor is not second.image_processor
    first.image_processor.size = {"shortest_edge": 1, "longest_edge": 2}
    assert hf.load_processor(copy).image_processor.size != first.image_processor.size
    assert hf.ChatEncoder(first).plain is hf.ChatEncoder(second).plain

    changed = tmp_path / "changed"
    shutil.copytree(source, changed)
    template = changed / "chat_template.jinja"
    template.write_text(template.read_text() + "\n")
    assert hf.load_processor(changed).tokenizer is not first.tokenizer


@pytest.mark.slow
def test_bf16_parts_stay_inside_the_bench_gates_and_are_refused_where_they_would_be_slower(merged, monkeypatch):
    """TorchOptions.bf16: the vision tower and the head in bfloat16 (lossy): the image embeddings and
    the logits stay within the bench's vision and KL gates on the tiny judge; on a CPU without native
    bf16 products the option is refused, saying why."""
    import numpy as np
    import torch
    from PIL import Image

    import dfj
    from dfj.tolerances import BENCH

    if not (torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()):
        with pytest.raises(ValueError, match="multiplies bf16 only by emulation"):
            dfj.load_judge(str(merged("pairwise")), bf16=("vision", "head"))
        return
    image = Image.new("RGB", (112, 84), (200, 30, 60))
    exact = dfj.load_judge(str(merged("pairwise")))
    fast = dfj.load_judge(str(merged("pairwise")), bf16=("vision", "head"))
    assert fast.runtime.describe()["bf16_parts"] == ["vision", "head"] and fast.runtime.describe()["dtype"] == "torch.float32"
    a, b = (j.runtime.embed_images([j.prompt(image, "fake", "a", "b")])[0] for j in (exact, fast))
    cosine = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert 0 < 1 - cosine.mean() < BENCH.vision_cos
    la, lb = (j.logprobs(image, "fake", "a", "b", continuation="<answer>A</answer>") for j in (exact, fast))
    kl = (np.exp(la.astype(np.float64)) * (la - lb)).sum(1)
    assert 0 < kl.mean() < BENCH.kld
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    with pytest.raises(ValueError, match="multiplies bf16 only by emulation"):
        dfj.load_judge(str(merged("pairwise")), bf16=("vision",))
    with pytest.raises(ValueError, match="bf16 takes parts vision, head"):
        dfj.load_judge(str(merged("pairwise")), bf16=("text",))
