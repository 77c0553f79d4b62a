"""The trained tiny judges (issue: quality numbers that mean something without the real weights).

The first run on a machine trains them (about 15 minutes on 2 cores with AMX, evaluation included)
into the dfj cache; later runs reuse them. The metrics are measured here, on the held-out synthetic
test split, with greedy verdicts.
"""

import json
import random

import pytest

from dfj.data import read_split
from dfj.tiny.synthetic import Scene, detector_response

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def metrics():
    from dfj.tiny import trained_tiny_root

    return json.loads((trained_tiny_root() / "metrics.json").read_text())


# The quality gates, set from the spread measured across builds (issue 23: seeds x CPU-kernel settings,
# `benchmarks/trained_spread.py`, docs/trained-judges.md): each sits below the worst build
# measured, with a margin, so that the judges trained on another machine pass them too.
GATES = {
    "pointwise_rmse_max": 0.95,
    "pointwise_pearson_min": 0.78,
    "parse_failure_max": 0.02,
    "pairwise_accuracy_min": 0.78,
    "text_decided_min": 0.9,
}
# Measured (pointwise RMSE / Pearson, pairwise accuracy): seeds 0-2 here 0.745-0.872 / 0.847-0.861,
# 0.871-0.891; seed 0 with AVX2 kernels 0.725 / 0.903, 0.870; an AMD EPYC machine (issue 23) 0.787 /
# 0.848, 0.815. Not gated: the blank-image controls. The pairwise judge is at chance on the
# pixel-decided pairs in every build; the pointwise judge uses the image in some builds (seeds 0 and 1:
# blanked, RMSE +0.63 and +0.55) and hardly in others (seed 2: +0.05; seed 0 with AVX2 kernels: +0.01),
# so a control gate would hold on one machine and fail on the next. metrics.json and the spread
# script still measure both.


def test_pointwise_judge_quality(metrics):
    q = metrics["pointwise"]["with_image"]
    assert q["pearson"] >= GATES["pointwise_pearson_min"] and q["rmse"] <= GATES["pointwise_rmse_max"], q
    assert q["parse_failure_rate"] <= GATES["parse_failure_max"], q


def test_pairwise_judge_accuracy(metrics):
    q = metrics["pairwise"]["with_image"]
    assert q["accuracy"] >= GATES["pairwise_accuracy_min"], q


def test_the_judges_grade_what_the_text_decides(metrics):
    """On the records whose gold the words decide (real images; a hedged 4; pairs of levels worded
    differently), both judges should be all but exact: what the training must teach whatever the
    pixels add."""
    from dfj.tiny import trained_tiny_split

    from dfj.tiny.training import _split_lines

    for mode in ("pointwise", "pairwise"):
        split = trained_tiny_split(mode)
        records, meta = read_split(split).records, _split_lines(split)
        golds = [r.gold_score if mode == "pointwise" else r.gold_choice for r in records]
        got = metrics[mode]["verdicts"]["with_image"]
        picked = [i for i, r in enumerate(records) if not meta[r.line]["meta"]["needs_image"]]
        right = sum(got[i] == golds[i] for i in picked) / len(picked)
        # How many records the text decides depends on the seed's split (seed 0: 102 and 748; seed 1: 69).
        assert len(picked) >= 60 and right >= GATES["text_decided_min"], (mode, right, len(picked))


def test_the_needs_image_subset_is_the_records_the_text_cannot_decide():
    """`meta.needs_image` in the synthetic splits: exactly the manipulated-image records whose levels
    read alike (5/3, 2/1, and for pairs a hedged 4 against a 5 or a 3), none on real images."""
    from dfj.tiny import trained_tiny_split

    decided_by_pixels = ({5, 3}, {2, 1}, {5, 4}, {4, 3})
    for mode in ("pointwise", "pairwise"):
        lines = (trained_tiny_split(mode) / "data.jsonl").read_text().splitlines()
        metas = [json.loads(line)["meta"] for line in lines]
        for meta in metas:
            levels = set(meta["levels"])
            expected = meta["artifact"] is not None and (levels != {4} if mode == "pointwise" else levels in decided_by_pixels)
            assert meta["needs_image"] == expected, meta
        assert 0 < sum(m["needs_image"] for m in metas) < len(metas)


def test_metrics_are_reproduced_by_a_fresh_evaluation():
    """The cached numbers are what the judge really does: re-judge part of the test split now."""
    import dfj
    from dfj.tiny import trained_tiny_judge, trained_tiny_split

    judge = dfj.load_judge(str(trained_tiny_judge("pairwise")))
    records = read_split(trained_tiny_split("pairwise")).records[:40]
    verdicts = judge.compare_many(records)
    accuracy = sum(v.choice == r.gold_choice for v, r in zip(verdicts, records)) / len(records)
    from dfj.tiny import trained_tiny_root

    cached = json.loads((trained_tiny_root() / "metrics.json").read_text())["pairwise"]["verdicts"]["with_image"]
    agree = sum(v.choice == c for v, c in zip(verdicts, cached)) / len(records)
    cached_accuracy = sum(c == r.gold_choice for c, r in zip(cached, records)) / len(records)
    # Greedy on the same weights: the same choices, up to a near-tie flipped by another batch shape.
    assert agree >= 0.95 and abs(accuracy - cached_accuracy) <= 0.05, (accuracy, cached_accuracy, agree)


def test_splits_are_dfj_layout_and_held_out():
    from dfj.tiny import trained_tiny_split

    for mode, per_image in (("pointwise", 5), ("pairwise", 10)):
        train, test = read_split(trained_tiny_split(mode, "train")), read_split(trained_tiny_split(mode, "test"))
        assert not train.errors and not test.errors and train.mode == test.mode == mode
        assert len(test) == len({r.image for r in test}) * per_image
        # Different images: the test images were rendered from another seed.
        train_pixels = {open(r.image, "rb").read() for r in train.records[::per_image]}
        assert not any(open(r.image, "rb").read() in train_pixels for r in test.records[::per_image])


def test_response_levels_need_the_image_to_tell_apart():
    """Levels 5 and 3 (and 2 and 1) use the same wording; only the cited artifact differs."""
    texture_scene, colour_scene = Scene("fake", "texture", "upper left"), Scene("fake", "colour", "upper left")
    fives = {detector_response(random.Random(i), texture_scene, 5) for i in range(50)}
    threes = {detector_response(random.Random(i), colour_scene, 3) for i in range(50)}
    # A level-5 response for one image is word for word a possible level-3 response for another.
    assert fives & threes


def test_training_batches_mark_exactly_the_target_tokens(tmp_path):
    """The loss positions are the target's tokens, found from one processor pass; a target whose
    tokens would merge with the prompt's is refused rather than trained on shifted labels."""
    import torch
    from PIL import Image
    from transformers import AutoProcessor

    from dfj import prompts
    from dfj.tiny import write_processor
    from dfj.tiny.training import _batch, _collate, _encode

    write_processor(tmp_path)
    processor = AutoProcessor.from_pretrained(tmp_path)
    image = Image.new("RGB", (112, 112), (30, 60, 90))
    chats = [prompts.render_chat("Describe the image."), prompts.render_chat(prompts.render_pairwise("fake", "a", "b"))]
    targets = ["There is a seam.<|im_end|>", "<answer>B</answer><|im_end|>"]
    inputs, positions, labels = _batch(processor, chats, targets, [image, image])
    expected = [processor.tokenizer(t)["input_ids"] for t in targets]
    assert labels.tolist() == expected[0] + expected[1]
    for row, ids in enumerate(expected):  # position p predicts the token at p + 1
        picked = positions[positions[:, 0] == row, 1] + 1
        assert inputs["input_ids"][row, picked].tolist() == ids
    # The base phase encodes each pooled example once and collates it on each draw: a batch collated
    # from kept encodings, in any order and again, is the batch built afresh.
    rows = [_encode(processor, chat, target, image) for chat, target in zip(chats, targets)]
    pad = processor.tokenizer.convert_tokens_to_ids("<|endoftext|>")
    _collate(rows, pad)
    again = _collate(rows[::-1], pad)
    fresh = _batch(processor, chats[::-1], targets[::-1], [image, image])
    assert again[0].keys() == fresh[0].keys() and all(torch.equal(again[0][k], fresh[0][k]) for k in fresh[0])
    assert torch.equal(again[1], fresh[1]) and torch.equal(again[2], fresh[2])
    with pytest.raises(ValueError, match="merge with the prompt"):
        _batch(processor, [chats[0] + "ans"], ["wer<|im_end|>"], [image])


def test_judge_phase_head_loss_is_the_fp32_cross_entropy_within_bf16_rounding():
    """The judge phase's loss over the full vocabulary runs the head in bf16, compiled where a C++
    compiler is present (the cost of a step), else eagerly: either way its value and its gradient
    must be the fp32 cross-entropy's, to bf16 rounding."""
    import torch

    from dfj.tiny.training import _full_head_loss, _head_cross_entropy, head_dtype

    generator = torch.Generator().manual_seed(0)
    head = torch.randn(5000, 256, generator=generator) * 0.1
    labels = torch.randint(0, 5000, (37,), generator=generator)

    def loss_and_grad(loss_fn, *weight):
        hidden = (torch.randn(37, 256, generator=torch.Generator().manual_seed(1)) * 3).requires_grad_()
        loss = loss_fn(hidden, *weight, labels) if weight else loss_fn(hidden @ head.T, labels)
        loss.backward()
        return loss.item(), hidden.grad

    reference, grad_reference = loss_and_grad(torch.nn.functional.cross_entropy)
    for loss_fn in (_full_head_loss(), _head_cross_entropy):
        got, grad = loss_and_grad(loss_fn, head.to(head_dtype()))  # the dtype training runs here
        assert abs(got - reference) <= 0.01 * reference, (loss_fn, got, reference)
        cosine = torch.nn.functional.cosine_similarity(grad.flatten(), grad_reference.flatten(), dim=0).item()
        assert cosine >= 0.999, (loss_fn, cosine)
        assert (grad - grad_reference).abs().max().item() <= 0.02 * grad_reference.abs().max().item(), loss_fn


def test_gold_reasoning_says_what_the_response_cites_and_whether_the_image_shows_it():
    from dfj.parse import parse_pointwise
    from dfj.tiny.synthetic import ARTIFACTS, cited_artifact, find_question, gold_pointwise

    for seed in range(30):
        for artifact in ARTIFACTS:
            scene = Scene("edited", artifact, "lower right")
            for level, named in ((5, True), (4, True), (3, False), (2, True), (1, False)):
                cited = cited_artifact(detector_response(random.Random(seed), scene, level))
                assert cited in ARTIFACTS and (cited == artifact) == named, (artifact, level, cited)
                verdict = parse_pointwise(gold_pointwise(level, artifact, cited))
                assert verdict.ok and verdict.score == level
                assert verdict.reasoning.startswith(f"Response cites: {cited} artifact.\n{find_question(cited)}\n"
                                                    f"{'Yes' if named else 'No'}.\n")
        real = [cited_artifact(detector_response(random.Random(seed), Scene("real", None, None), level)) for level in range(1, 6)]
        assert real[0] in ARTIFACTS and real[1:] == [None] * 4
        assert parse_pointwise(gold_pointwise(1, None, real[0])).reasoning.startswith(
            f"Response cites: {real[0]} artifact.\n{find_question(real[0])}\nNo.\n")
        assert "<reasoning>Response cites: no artifact.\nRight class, grounded." in gold_pointwise(5, None, real[4])


def test_the_recipe_is_deterministic_on_one_machine(tmp_path):
    """Same seed, same machine, same weights: a few steps of each phase, run twice, give byte-identical
    parameters (the full build's weights are cached on this, and issue 23 measures the spread *across*
    machines against it). A shortened run, not the full build: the same code path, a tenth of a minute."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

    from dfj.hf import peft_without_gptq_probe
    from dfj.tiny.synthetic import build_synthetic_split
    from dfj.tiny.model import LORA_EXCLUDE, LORA_TARGETS, tiny_config, write_processor
    from dfj.tiny.training import TrainSettings, train_base, train_judge

    settings = TrainSettings(base_steps=3, base_batch=2, train_images=4, judge_batch=2,
                             judge_steps={"pointwise": 2, "pairwise": 2})
    write_processor(tmp_path / "processor")
    processor = AutoProcessor.from_pretrained(tmp_path / "processor")
    split = build_synthetic_split(tmp_path / "split", "pairwise", images=2, per_image=2, seed=5)

    def run() -> dict:
        torch.manual_seed(settings.seed)
        model = Qwen2_5_VLForConditionalGeneration(tiny_config()).to(torch.float32)
        train_base(model, processor, settings, log=lambda _: None)
        torch.manual_seed(settings.seed + 1)
        config = LoraConfig(r=4, lora_alpha=8, target_modules=LORA_TARGETS, exclude_modules=LORA_EXCLUDE,
                            lora_dropout=0.0, task_type="CAUSAL_LM")
        with peft_without_gptq_probe():
            peft_model = get_peft_model(model, config)
        train_judge(peft_model, processor, split, settings, log=lambda _: None)
        return {k: v.detach().clone() for k, v in peft_model.state_dict().items()}

    first, second = run(), run()
    assert first.keys() == second.keys()
    changed = [k for k in first if not torch.equal(first[k], second[k])]
    assert not changed, changed[:5]
    # The run trained something: the LoRA B matrices left zero.
    assert any(k.endswith("lora_B.default.weight") and first[k].abs().sum() > 0 for k in first)


def test_the_head_runs_in_bf16_only_where_the_cpu_multiplies_bf16_natively(monkeypatch):
    """Emulated bf16 products are 3x (AVX-512) to 5x (AVX2) slower than fp32: there the judge phase's
    head stays fp32, or the first training on such a machine would take hours."""
    import torch

    from dfj.tiny.training import head_dtype

    native = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    assert head_dtype() == (torch.bfloat16 if native else torch.float32)
    for capped in ("AVX2", "avx512_core"):
        monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", capped)
        assert head_dtype() == torch.float32
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_BF16")
    assert head_dtype() == torch.bfloat16
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    assert head_dtype() == torch.float32


def test_the_head_loss_is_compiled_only_where_inductor_can_build_it(monkeypatch):
    """With ATen on its scalar kernels (ATEN_CPU_CAPABILITY=default, or a CPU without AVX2), inductor's
    vector code for the head loss does not compile: training then runs the loss eagerly."""
    import shutil

    import torch

    from dfj.tiny.training import _full_head_loss, _head_cross_entropy

    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "DEFAULT")
    assert _full_head_loss.__wrapped__() is _head_cross_entropy
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    compiled = _full_head_loss.__wrapped__()
    assert (compiled is not _head_cross_entropy) == bool(shutil.which("g++") or shutil.which("c++") or shutil.which("clang++"))
