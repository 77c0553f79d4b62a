"""GGUF export and the llama.cpp runtime, against transformers, on the trained tiny judges."""

import json
import shutil

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import dfj
from dfj.cli import app
from dfj.export import export
from dfj.images import fit_to_grid
from dfj.manifest import read_manifest, verify

pytestmark = pytest.mark.slow

RECORDS = 16  # held-out records per mode for the f32 / f16 checks


@pytest.fixture(scope="module")
def gguf(module_dir, trained_gguf):
    from dfj.tiny import trained_tiny_judge

    built = {(mode, quant): trained_gguf(mode, quant) for mode in ("pointwise", "pairwise") for quant in ("f32", "f16")}
    built["merged"] = export(trained_tiny_judge("pointwise"), module_dir("gguf") / "merged", "none", dtype="float32")
    return built


@pytest.fixture(scope="module")
def records():
    from dfj.data import read_split
    from dfj.tiny import trained_tiny_split

    return {mode: read_split(trained_tiny_split(mode, "test"), mode=mode).records[:RECORDS] for mode in ("pointwise", "pairwise")}


@pytest.fixture(scope="module")
def reference_outputs(judges, records):
    """The torch fp32 reference judge's greedy output for each held-out record."""
    from dfj.tiny import trained_tiny_judge

    return {mode: judges(trained_tiny_judge(mode), dtype="float32").judge_many(records[mode]) for mode in records}


def varied_strings() -> list[str]:
    """Over 200 strings that stress a byte-level BPE: scripts, emoji, digits, whitespace, DFJ tags."""
    fixed = [
        "", " ", "  ", "\n", "\n\n\n", "\t", " \t \n ", "a", "A", "hello world", "Hello, World!", "it's", "don't",
        "I'M", "we'll", "they've", "12345678901234567890", "3.14159", "1,000,000", "-42", "0x1F", "2026-11-29",
        "<reasoning>The face is blurred.</reasoning> <answer>fake</answer>", "<score>5</score>",
        "<answer>A</answer>", "<answer>B</answer>", "<|im_start|>user\nhi<|im_end|>", "<|endoftext|>",
        "<|vision_start|><|image_pad|><|vision_end|>", "<tool_call>{}</tool_call>", "{your reasoning}",
        "{A_or_B}", "{{double}}", "naïve café", "Größe", "東京は晴れ", "深度伪造检测", "한국어 텍스트",
        "Привет, мир", "مرحبا بالعالم", "שלום", "हिन्दी", "ไทย", "😀", "👩‍👩‍👧‍👦", "🇺🇸🇫🇷", "a😀b", "e\u0301",
        "\u200b", "\u00a0non-breaking", "tab\tseparated", "line\r\nbreak", "trailing space ", " leading",
        "    indented code", "def f(x):\n    return x**2", "SELECT * FROM t;", "https://example.com/a?b=c",
        "user@example.com", "C:\\path\\to\\file", "$$x^2$$", "100%", "#hashtag", "@mention", "…", "—", "“quoted”",
        "ﬁ ligature", "Ω≈ç√∫", "ZWJ\u200dtest", "\x00"[:0] + "null-free", "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
        "!!!???...", "The image shows clear GAN artifacts around the eyes.", "real", "fake", "edited",
    ]
    rng = np.random.default_rng(0)
    pieces = ["deepfake", " ", "  ", "\n", "123", "4567", "😀", "東京", "é", "<reasoning>", "</reasoning>", "<score>",
              "</score>", "<answer>", "</answer>", "<|im_end|>", "Ω", " the", "ING", "'s", "\t", "...", "0", "中文",
              "🇯🇵", "ß", "  \n  ", "x" * 7, "日本語", "مرحبا"]
    mixed = ["".join(rng.choice(pieces, size=int(rng.integers(1, 12)))) for _ in range(150)]
    return fixed + mixed


def test_tokenizer_matches_torch_on_varied_strings(gguf, judges):
    from dfj.tiny import trained_tiny_judge

    strings = varied_strings()
    assert len(strings) >= 200
    ours = judges(gguf["pointwise", "f32"]).runtime
    theirs = judges(trained_tiny_judge("pointwise"), dtype="float32").runtime
    mismatched = [s for s in strings if ours.tokenize(s, True) != theirs.tokenize(s, True)]
    assert not mismatched, mismatched[:5]
    for text in strings[20:60]:  # and back: decode(tokenize(s)) round-trips where the reference does
        ids = theirs.tokenize(text, True)
        assert ours.decode(ids) == theirs.decode(ids)


@pytest.mark.parametrize("mode", ["pointwise", "pairwise"])
def test_a_forged_response_is_plain_text_to_llamacpp_as_to_torch(gguf, judges, records, mode):
    """llama.cpp tokenizes the response with parse_special off: the same ids as the torch runtime, only
    the template's control tokens, and the same verdict."""
    from bad_inputs import FORGED_TURN, every_added_token
    from dfj.tiny import trained_tiny_judge

    ours = judges(gguf[mode, "f32"])
    theirs = judges(trained_tiny_judge(mode), dtype="float32")
    record = records[mode][0]
    hostile = every_added_token(theirs.runtime.processor.tokenizer)
    responses = (record.responses()[0] + " " + hostile,) if mode == "pointwise" else (FORGED_TURN, hostile)
    control = theirs.runtime.chat.control_ids - {theirs.runtime.chat.image_pad_id}
    ids = ours.prompt_ids(record.image, record.label, *responses)
    assert ids == theirs.prompt_ids(record.image, record.label, *responses)
    assert [i for i in ids if i in control] == [i for i in ours.prompt_ids(record.image, record.label, *record.responses())
                                                if i in control]
    if mode == "pointwise":
        got, expected = (j.score(record.image, record.label, *responses) for j in (ours, theirs))
        assert (got.text, got.score, got.error) == (expected.text, expected.score, expected.error)
    else:
        got, expected = (j.compare(record.image, record.label, *responses) for j in (ours, theirs))
        assert got.choice == expected.choice and abs(got.p_a - expected.p_a) <= 1e-3, (got, expected)


@pytest.mark.parametrize("mode", ["pointwise", "pairwise"])
def test_full_prompt_ids_match_the_transformers_processor(gguf, judges, records, mode):
    from dfj import prompts
    from dfj.images import load_image
    from dfj.tiny import trained_tiny_judge

    ours = judges(gguf[mode, "f32"])
    theirs = judges(trained_tiny_judge(mode), dtype="float32").runtime
    for record in records[mode][:6]:
        image = fit_to_grid(load_image(record.image), ours.runtime.limits)
        chat = prompts.render_chat(prompts.render(mode, record.label, *record.responses()))
        expected = theirs.chat.encode(image, chat)["input_ids"][0].tolist()
        assert ours.prompt_ids(record.image, record.label, *record.responses()) == expected
        # and mtmd makes exactly that many image tokens of the image
        prompt = ours.prompt(record.image, record.label, *record.responses())
        assert ours.runtime.embed_images([prompt])[0].shape[0] == expected.count(theirs.chat.image_pad_id)


@pytest.mark.parametrize("size", [(84, 112), (300, 120), (56, 560), (448, 336)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_f32_vision_embeddings_match_transformers(gguf, judges, size):
    from PIL import Image

    rng = np.random.default_rng(sum(size))
    image = fit_to_grid(Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8), "RGB"))
    judge = judges(gguf["pointwise", "f32"])
    ours = judge.runtime.embed_images([judge.prompt(image, "fake", "a response")])[0]
    reference = judges(gguf["merged"]).runtime  # the LoRA leaves the vision tower as it is
    inputs = reference.processor.image_processor(images=[image], return_tensors="pt")
    with torch.inference_mode():
        out = reference.model.model.visual(inputs["pixel_values"], grid_thw=inputs["image_grid_thw"])
    theirs = getattr(out, "pooler_output", out).reshape(ours.shape).numpy()
    cosine = (ours * theirs).sum(-1) / np.linalg.norm(ours, axis=-1) / np.linalg.norm(theirs, axis=-1)
    assert cosine.min() >= 0.9999, cosine.min()


def test_the_torch_vision_encoder_is_the_mmprojs_tower_read_back(gguf, judges):
    """`vision="torch"` puts the mmproj's tensors back through the export's plan: on an f32 artifact every
    weight is the merged checkpoint's, bit for bit, and the embeddings are transformers' (cosine 1 - 1e-6,
    closer than mtmd's masked attention gets); bf16 arithmetic stays inside the bench's vision gate."""
    import gguf as gguf_lib
    from PIL import Image

    from dfj.artifact.checkpoint import Checkpoint
    from dfj.runtime.llamacpp.torch_vision import tower_weights, vision_config
    from dfj.tolerances import BENCH

    reader = gguf_lib.GGUFReader(gguf["pointwise", "f32"] / "mmproj.gguf")
    merged = Checkpoint(gguf["merged"])
    visual = {key.removeprefix("model.").removeprefix("visual."): key for key in merged.keys() if ".visual." in f".{key}"}
    weights = dict(tower_weights(reader, vision_config(reader), {k: tuple(merged.shapes[v]) for k, v in visual.items()}))
    assert weights.keys() == visual.keys()
    assert all(np.array_equal(weights[k], merged.read(v).float().numpy()) for k, v in visual.items())

    rng = np.random.default_rng(5)
    image = fit_to_grid(Image.fromarray(rng.integers(0, 256, (300, 448, 3), dtype=np.uint8), "RGB"))
    reference = judges(gguf["merged"]).runtime
    inputs = reference.processor.image_processor(images=[image], return_tensors="pt")
    with torch.inference_mode():
        out = reference.model.model.visual(inputs["pixel_values"], grid_thw=inputs["image_grid_thw"])
    theirs = getattr(out, "pooler_output", out).numpy()

    def cosines(encoder: str) -> np.ndarray:  # per image token
        judge = judges(gguf["pointwise", "f32"], vision=encoder)
        assert judge.runtime.describe()["vision_encoder"] == encoder
        ours = judge.runtime.embed_images([judge.prompt(image, "fake", "a response")])[0]
        return (ours * theirs).sum(-1) / np.linalg.norm(ours, axis=-1) / np.linalg.norm(theirs, axis=-1)

    torch_cos, mtmd_cos = cosines("torch").min(), cosines("mtmd").min()
    assert torch_cos >= 1 - 1e-6 and torch_cos >= mtmd_cos, (torch_cos, mtmd_cos)
    if torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported():
        assert 1 - cosines("torch-bf16").mean() <= BENCH.vision_cos  # the bench's gate, as it measures


def test_the_torch_vision_encoder_judges_as_the_reference_on_every_record(gguf, judges, records, reference_outputs):
    """The torch encoder's embeddings go where mtmd's went: the f32 artifact's greedy text stays the
    reference's token for token, and p_a moves by no more than the vision arithmetic does."""
    for mode in ("pointwise", "pairwise"):
        verdicts = judges(gguf[mode, "f32"], vision="torch").judge_many(records[mode])
        assert [v.text for v in verdicts] == [v.text for v in reference_outputs[mode]]
        if mode == "pairwise":
            mtmd = judges(gguf[mode, "f32"]).judge_many(records[mode])
            assert max(abs(a.p_a - b.p_a) for a, b in zip(verdicts, mtmd)) <= 1e-3


def test_the_vision_encoder_option_is_checked_before_anything_loads(monkeypatch, tmp_path):
    from types import SimpleNamespace

    from dfj.images import PixelLimits
    from dfj.runtime.llamacpp.torch_vision import TorchVision, vision_config
    from dfj.runtime.options import LlamaCppOptions

    with pytest.raises(ValueError, match="vision must be one of mtmd, torch, torch-bf16, not 'onnx'"):
        LlamaCppOptions.parse("llama.cpp", {"vision": "onnx"})
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    with pytest.raises(ValueError, match="multiplies bf16 only by emulation"):
        TorchVision(tmp_path / "absent.gguf", PixelLimits(), "torch-bf16")

    def reader(**fields):
        return SimpleNamespace(fields={k: SimpleNamespace(contents=lambda v=v: v) for k, v in fields.items()})

    with pytest.raises(ValueError, match="not 'llava'"):
        vision_config(reader(**{"clip.projector_type": "llava"}))
    with pytest.raises(ValueError, match="SiLU"):
        vision_config(reader(**{"clip.projector_type": "qwen2.5vl_merger", "clip.use_gelu": True}))
    with pytest.raises(ValueError, match="lacks clip.vision.block_count"):
        vision_config(reader(**{"clip.projector_type": "qwen2.5vl_merger", "clip.use_silu": True}))


def _kld(reference: np.ndarray, candidate: np.ndarray) -> np.ndarray:
    p = np.exp(reference.astype(np.float64))
    return (p * (reference.astype(np.float64) - candidate.astype(np.float64))).sum(-1)


# f32: the lossless path; f16: half-precision weights. Mean KL(torch fp32 ‖ GGUF) over every output token:
# f32 under 1e-4 on judges trained on AVX-512 machines, 1.14e-4 on the one trained on an AVX2-only EPYC
# (llama.cpp's f32 arithmetic is not torch's; its greedy text stays identical, asserted above).
KLD_BOUNDS = {"f32": 3e-4, "f16": 1e-3}


@pytest.mark.parametrize("quant", ["f32", "f16"])
@pytest.mark.parametrize("mode", ["pointwise", "pairwise"])
def test_lossless_and_f16_match_the_reference_on_every_record(gguf, judges, records, reference_outputs, mode, quant):
    from dfj.tiny import trained_tiny_judge

    judge = judges(gguf[mode, quant])
    verdicts = judge.judge_many(records[mode])
    expected = reference_outputs[mode]
    if quant == "f32":  # greedy output identical, token for token
        assert [v.text for v in verdicts] == [v.text for v in expected]
    fields = ("score",) if mode == "pointwise" else ("choice",)
    assert [[getattr(v, f) for f in fields] for v in verdicts] == [[getattr(v, f) for f in fields] for v in expected]
    reference = judges(trained_tiny_judge(mode), dtype="float32")
    klds = []
    for record, verdict in zip(records[mode], expected):
        args = (record.image, record.label, *record.responses())
        continuation = verdict.text + "<|im_end|>"
        klds.extend(_kld(reference.logprobs(*args, continuation=continuation), judge.logprobs(*args, continuation=continuation)))
    assert len(klds) > RECORDS
    assert float(np.mean(klds)) <= KLD_BOUNDS[quant], float(np.mean(klds))


def test_kv_reuse_across_records_gives_the_logits_of_a_fresh_runtime(gguf, records):
    """Sequence 0 keeps a group's head between calls: records on one image reuse what they share; an
    image seen before is not encoded again; the results are those of a fresh runtime."""
    import dfj
    from dfj.runtime.base import Scoring

    by_image: dict[str, list] = {}
    for record in records["pointwise"]:
        by_image.setdefault(record.image, []).append(record)
    group = max(by_image.values(), key=len)
    other = next(r for r in records["pointwise"] if r.image != group[0].image)
    warm = dfj.load_judge(str(gguf["pointwise", "f32"]))
    forced = Scoring(tuple(warm.runtime.tokenize("<reasoning>ok</reasoning>\n<score>3</score>", True)), full=True)
    for record in group + [other] + group[:1]:
        prompt = warm.prompt(record.image, record.label, *record.responses())
        reused = warm.runtime.score([prompt], [forced])[0].rows
        generated = warm.runtime.generate([prompt], 12)[0]
        fresh = dfj.load_judge(str(gguf["pointwise", "f32"]))
        assert np.array_equal(reused, fresh.runtime.score([prompt], [forced])[0].rows)
        assert generated == fresh.runtime.generate([prompt], 12)[0]
        fresh.runtime.close()
    # The return to the first image after another one takes its embeddings from the vision cache.
    assert warm.runtime.stats["vision_misses"] == 2 and warm.runtime.stats["vision_hits"] == 1
    assert warm.runtime.stats["prefix_hits"] >= 2 * len(group) - 1
    warm.runtime.close()


@pytest.mark.parametrize("mode", ["pointwise", "pairwise"])
@pytest.mark.parametrize("quant", ["f32", "f16"])
def test_judging_a_file_in_groups_equals_one_record_at_a_time(gguf, judges, mode, quant, tmp_path, monkeypatch):
    """Groups run as several KV sequences in one decode batch (pointwise: every unfinished sequence
    advanced in each step), each prompt's own text in one batch whatever the group holds: the same greedy
    text and the same p_a, to the bit, as one record at a time."""
    from batch_parity import assert_batch_equals_single
    from dfj.runtime.llamacpp import LlamaCppRuntime
    from dfj.tiny import trained_tiny_split

    sizes = []
    original = LlamaCppRuntime._run_group

    def spy(self, group, extras, outputs):
        sizes.append(len(group))
        return original(self, group, extras, outputs)

    monkeypatch.setattr(LlamaCppRuntime, "_run_group", spy)
    assert_batch_equals_single(judges(gguf[mode, quant]), trained_tiny_split(mode, "test"), tmp_path, n=24, p_a_atol=1e-5)
    assert max(sizes) > 1


def test_artifact_manifest_metadata_and_runtime(gguf, judges):
    import gguf as gguf_lib

    folder = gguf["pointwise", "f16"]
    manifest = verify(folder)
    assert manifest.format == "gguf" and manifest.quant == "gguf-f16"
    info = manifest.extra["gguf"]
    assert info["bytes"]["model.gguf"] == (folder / "model.gguf").stat().st_size
    assert info["mmproj_dtype"] == "f16"
    assert sorted(p.name for p in folder.iterdir()) == ["dfj.json", "mmproj.gguf", "model.gguf"]
    text = gguf_lib.GGUFReader(folder / "model.gguf")
    field = lambda reader, key: reader.fields[key].contents()  # noqa: E731
    assert field(text, "general.architecture") == "qwen2vl"
    assert field(text, "qwen2vl.rope.dimension_sections") == [8, 12, 12, 0]
    assert field(text, "tokenizer.ggml.pre") == "qwen2" and field(text, "tokenizer.ggml.model") == "gpt2"
    assert len(field(text, "tokenizer.ggml.tokens")) == 151936
    assert "<|im_start|>" in field(text, "tokenizer.chat_template")
    assert field(text, "tokenizer.ggml.add_bos_token") is False
    vision = gguf_lib.GGUFReader(folder / "mmproj.gguf")
    assert field(vision, "clip.projector_type") == "qwen2.5vl_merger"
    assert field(vision, "clip.vision.n_wa_pattern") == 2  # full attention in blocks 1 and 3
    names = {t.name for t in vision.tensors}
    assert {"v.patch_embd.weight", "v.patch_embd.weight.1", "v.blk.0.attn_q.weight", "v.blk.3.attn_v.bias"} <= names
    judge = judges(folder)
    assert judge.runtime.name == "llamacpp"
    with pytest.raises(ValueError, match="precision it was exported with"):
        dfj.load_judge(str(folder), dtype="bfloat16")


def test_export_gate_refuses_a_mis_mapped_tensor(gguf, monkeypatch, tmp_path):
    """A classic conversion bug — one layer's gate and up projections swapped — fails the f32 probe
    gate (so the gate can fail), and nothing is left at the output path; the real export passes it."""
    from dfj.export import gguf as gguf_export
    from dfj.tiny import trained_tiny_judge

    passed = read_manifest(gguf["pointwise", "f32"]).parity
    from dfj.tolerances import EXPORT

    assert passed["cosine"] >= EXPORT.gguf_f32_min_cosine and passed["max_abs_diff"] <= EXPORT.gguf_f32_max_abs
    plan = gguf_export.plan_tensors

    def swapped(shapes, config):
        from dataclasses import replace

        text, vision = plan(shapes, config)
        keys = {t.name: t.key for t in text}
        other = {"blk.0.ffn_gate.weight": keys["blk.0.ffn_up.weight"], "blk.0.ffn_up.weight": keys["blk.0.ffn_gate.weight"]}
        return [replace(t, key=other[t.name]) if t.name in other else t for t in text], vision

    monkeypatch.setattr(gguf_export, "plan_tensors", swapped)
    out = tmp_path / "bad"
    with pytest.raises(RuntimeError, match="does not match transformers"):
        export(trained_tiny_judge("pointwise"), out, "gguf-f32")
    assert not out.exists()


def test_cli_batch_judges_a_gguf_artifact_as_the_merged_model(gguf, tmp_path):
    from dfj.tiny import trained_tiny_split

    # The split's first 48 lines (10 of its 40 images, a group of five responses on each but the last):
    # grouped batches through the command, at a quarter of the time of all 200.
    source, split = trained_tiny_split("pointwise", "test"), tmp_path / "split"
    shutil.copytree(source / "images", split / "images")
    (split / "data.jsonl").write_bytes(b"".join((source / "data.jsonl").read_bytes().splitlines(keepends=True)[:48]))
    runner = CliRunner()
    outputs = {}
    for name, artifact in (("gguf", gguf["pointwise", "f32"]), ("merged", gguf["merged"])):
        out = tmp_path / f"{name}.jsonl"
        result = runner.invoke(app, ["judge", str(artifact), "--data", str(split), "--out", str(out)])
        assert result.exit_code == 0, result.output
        outputs[name] = [json.loads(line)["dfj"] for line in out.read_text(encoding="utf-8").splitlines()]
    assert len(outputs["gguf"]) == 48
    without = {name: [{k: v for k, v in row.items() if k != "provenance"} for row in rows] for name, rows in outputs.items()}
    assert without["gguf"] == without["merged"]
    # Each line names the judge that gave it: another artifact and runtime, another run.
    assert {row["provenance"]["run_id"] for row in outputs["gguf"]}.isdisjoint(row["provenance"]["run_id"] for row in outputs["merged"])


# Stated bounds for llama.cpp's quantized text models on the trained tiny judges (hidden size 256, so
# every K-quant block is exercised), 24 held-out records. Measured: q8_0 mean KLD 4.7e-6 (pointwise) /
# 3.0e-5 (pairwise), top-1 1.0, same verdicts; q4_k_m 0.012 / 0.0033, top-1 0.993 / 1.0, verdict
# agreement 0.79 / 1.0 (a tiny judge's score is fragile; a 3B judge's is not measured here).
QUANT_BOUNDS = {"q8_0": {"kld": 0.001, "top1": 0.99, "agree": 0.95}, "q4_k_m": {"kld": 0.05, "top1": 0.97, "agree": 0.65}}


@pytest.mark.parametrize("mode", ["pointwise", "pairwise"])
def test_quantized_gguf_stays_within_stated_bounds(trained_gguf, module_dir, mode):
    from dfj.bench.run import BenchJudge, run_bench
    from dfj.tiny import trained_tiny_judge, trained_tiny_split

    root = module_dir(f"gguf-quant-{mode}")
    built = {q: trained_gguf(mode, q) for q in QUANT_BOUNDS}  # quantized from the f16 export, as the shortcut does
    artifacts = [BenchJudge(str(folder), "llamacpp", label=q) for q, folder in built.items()]
    report = run_bench(BenchJudge(str(trained_tiny_judge(mode)), "torch", label="reference"), artifacts,
                       trained_tiny_split(mode, "test"), root / "report", limit=24)
    measured = {}
    for entry in report.artifacts:
        bounds, parity = QUANT_BOUNDS[entry.name], entry.parity
        measured[entry.name] = {"kld_mean": parity["kld_mean"], "top1": parity["top1_agreement"],
                                "agreement": entry.agreement, "bytes": entry.cost.size_bytes}
        assert entry.error is None, entry.error
        assert parity["tokens"] > 24 and parity["kld_mean"] <= bounds["kld"], parity
        assert parity["top1_agreement"] >= bounds["top1"] and entry.agreement >= bounds["agree"], entry
        assert read_manifest(built[entry.name]).quant == f"gguf-{entry.name}"
    print(f"\n{mode} GGUF quantization vs torch fp32: {json.dumps(measured)}")
    assert measured["q4_k_m"]["bytes"] < measured["q8_0"]["bytes"]


@pytest.mark.parametrize("size", ["3B", "7B"])
def test_tensor_map_is_complete_for_the_real_configurations(size):
    from transformers import Qwen2_5_VLForConditionalGeneration

    from dfj.tiny.full_depth import judge_config, real_shapes
    from dfj.tensor_names import plan_tensors

    text, vision = real_shapes(size)  # the released judges' shapes: the 3B ties its head, the 7B does not
    tied = text["tie_word_embeddings"]
    config = judge_config(text, vision)
    with torch.device("meta"):
        model = Qwen2_5_VLForConditionalGeneration(config)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if tied:
        shapes.pop("lm_head.weight", None)
    as_dict = json.loads(config.to_json_string())
    text_plan, vision_plan = plan_tensors(shapes, as_dict)
    layers = text["num_hidden_layers"]
    # 12 tensors per decoder layer (q/k/v with biases), token_embd, output_norm, and output unless tied.
    assert len(text_plan) == 12 * layers + 2 + (0 if tied else 1)
    assert ("output.weight" in {t.name for t in text_plan}) is not tied
    # 16 per vision block (qkv split into 3 weights + 3 biases), 2 patch kernels, post_ln, 2x merger (w, b).
    assert len(vision_plan) == 16 * 32 + 2 + 1 + 4
    names = [t.name for t in text_plan + vision_plan]
    assert len(names) == len(set(names))
    q = next(t for t in vision_plan if t.name == "v.blk.0.attn_q.weight")
    assert q.shape == (1280, 1280)
    with pytest.raises(ValueError, match="no GGUF name.*model.layers.0.mlp.extra.weight"):
        plan_tensors({**shapes, "model.layers.0.mlp.extra.weight": (4,)}, as_dict)
    if not tied:
        shapes.pop("lm_head.weight")
        with pytest.raises(ValueError, match="lacks output.weight"):
            plan_tensors(shapes, as_dict)


def test_a_shallow_vision_tower_maps_its_projector_and_an_all_full_attention_one_is_refused(tmp_path):
    from transformers import Qwen2_5_VLForConditionalGeneration

    from dfj.tensor_names import plan_tensors
    from dfj.export.gguf import _vision_metadata
    from dfj.tiny.full_depth import judge_config, real_shapes

    for depth in (1, 2):  # the projector's linears are mm.0 / mm.2 whatever the depth
        config = judge_config(*real_shapes("3B", 1, depth))
        with torch.device("meta"):
            shapes = {k: tuple(v.shape) for k, v in Qwen2_5_VLForConditionalGeneration(config).state_dict().items()}
        shapes.pop("lm_head.weight", None)
        _, vision_plan = plan_tensors(shapes, json.loads(config.to_json_string()))
        assert {"mm.0.weight", "mm.2.weight"} <= {t.name for t in vision_plan}
    # One block, full attention: llama.cpp's mtmd would abort the process on the first image.
    one_block = json.loads(judge_config(*real_shapes("3B", 1, 1)).to_json_string())
    assert one_block["vision_config"]["fullatt_block_indexes"] == [0]
    with pytest.raises(ValueError, match="every vision block is full attention"):
        _vision_metadata(one_block, tmp_path, "x", "f16")


NO_TORCH = """
import json, sys
for name in ("torch", "transformers", "torchvision", "peft", "onnxruntime", "gguf"):
    sys.modules[name] = None  # an edge install: dfj + llama-cpp-python only
import dfj
judge = dfj.load_judge(sys.argv[1])
print(json.dumps(judge.score(sys.argv[2], sys.argv[3], sys.argv[4]).to_dict()))
"""


def test_judging_a_gguf_artifact_needs_no_torch(gguf, judges, records):
    import subprocess
    import sys

    record = records["pointwise"][0]
    folder = gguf["pointwise", "f16"]
    done = subprocess.run([sys.executable, "-c", NO_TORCH, str(folder), record.image, record.label, record.response],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    expected = judges(folder).score(record.image, record.label, record.response).to_dict()
    assert json.loads(done.stdout.strip().splitlines()[-1]) == expected
