"""Train small DFJ-like judges on CPU, mirroring the real recipe at small scale.

1. Base: a small Qwen2.5-VL (real architecture, real tokenizer) trained from scratch, vision tower
   included, on three skills a real base brings to its fine-tune: describe the image's artifact
   ("There is a texture artifact in the upper left."), answer whether an artifact of a named type is
   in the image, and read which artifact type a detector response cites.
2. Judges: a LoRA on the language model only (vision tower frozen, as ms-swift's --freeze_vit),
   trained on DFJ prompts and gold judge outputs, one adapter per mode.

Loss is taken only on the assistant tokens, and the output head is applied only there: the head over
152k tokens on every prompt position would cost more than the layers.
"""

from __future__ import annotations

import functools
import math
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from dfj import prompts
from dfj.data import read_split
from dfj.images import load_image
from dfj.parse import parse_pairwise
from dfj.tiny.synthetic import ARTIFACT_WORDS, ARTIFACTS, cited_artifact, detector_response, find_question, random_scene, render_image

Log = Callable[[str], None]


class TrainingClock:
    """The time a first build has left, for its progress lines. Work is counted in base-step units, the
    other kinds weighted by their cost relative to a base step as measured on 2 cores (a judge step
    carries the 152k-token head at every target position; evaluation judges 1,200 records twice).
    Time left = the time spent per unit so far x the units left, so the estimate follows this machine."""

    JUDGE_STEP = 1.5
    EVALUATION = 290.0  # both modes, with and without the image

    def __init__(self, settings: "TrainSettings") -> None:
        self.total = settings.base_steps + self.JUDGE_STEP * sum(settings.judge_steps.values()) + self.EVALUATION
        self.done = 0.0
        self.started = time.perf_counter()

    def advance(self, units: float) -> None:
        self.done += units

    def left(self) -> str:
        if self.done <= 0:
            return ""
        seconds = (time.perf_counter() - self.started) * (self.total - self.done) / self.done
        return f"; about {max(1, round(seconds / 60))} min left" if seconds >= 30 else "; under a minute left"


@dataclass
class TrainSettings:
    seed: int = 0
    base_steps: int = 1000
    base_batch: int = 16
    base_lr: float = 2e-3
    judge_steps: dict[str, int] | None = None  # per mode; defaults in __post_init__
    judge_batch: int = 8
    judge_lr: dict[str, float] | None = None  # per mode; defaults in __post_init__
    lora_rank: int = 16
    train_images: int = 400
    threads: int | None = None

    def __post_init__(self) -> None:
        self.judge_steps = self.judge_steps or {"pointwise": 450, "pairwise": 500}
        self.judge_lr = self.judge_lr or {"pointwise": 2e-3, "pairwise": 1e-3}


def _encode(processor, chat: str, target: str, image):
    """Tokenize one (chat, target) pair with its image: the encoding and the prompt's length."""
    enc = processor(text=[chat + target], images=[image], return_tensors="pt")
    # The prompt is everything before the target's tokens (the chat ends with a special token and a
    # newline, so no merge crosses the boundary): one pass of the image processor, not two.
    target_ids = processor.tokenizer(target)["input_ids"]
    prompt_len = enc["input_ids"].shape[1] - len(target_ids)
    if enc["input_ids"][0, prompt_len:].tolist() != target_ids:
        raise ValueError(f"the target's tokens merge with the prompt's: {target[:40]!r}")
    return enc, prompt_len


def _batch(processor, chats: list[str], targets: list[str], images: list):
    """Tokenize each (chat, target) pair with its image; `_collate` the encodings."""
    return _collate([_encode(processor, chat, target, image) for chat, target, image in zip(chats, targets, images)],
                    processor.tokenizer.convert_tokens_to_ids("<|endoftext|>"))


def _collate(rows: list, pad: int):
    """Pad `_encode`d rows on the right into one batch: the inputs, the target positions (row, position
    that predicts a target token) and the target tokens. Reads the rows, never changes them: the base
    phase collates each encoding many times."""
    import torch

    width = max(enc["input_ids"].shape[1] for enc, _ in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    mm = torch.zeros((len(rows), width), dtype=torch.long)
    positions, labels = [], []
    for i, (enc, prompt_len) in enumerate(rows):
        n = enc["input_ids"].shape[1]
        ids[i, :n] = enc["input_ids"][0]
        mask[i, :n] = 1
        mm[i, :n] = enc["mm_token_type_ids"][0]
        for pos in range(prompt_len, n):  # position pos-1 predicts token pos
            positions.append((i, pos - 1))
            labels.append(int(enc["input_ids"][0, pos]))
    inputs = {
        "input_ids": ids,
        "attention_mask": mask,
        "mm_token_type_ids": mm,
        "pixel_values": torch.cat([enc["pixel_values"] for enc, _ in rows]),
        "image_grid_thw": torch.cat([enc["image_grid_thw"] for enc, _ in rows]),
    }
    return inputs, torch.tensor(positions), torch.tensor(labels)


def _loss(model, inputs, positions, labels, vocab=None, head=None):
    """Cross-entropy at the target positions: over `vocab` (sorted token ids) only, if given; else over
    the full vocabulary through `head`, a frozen copy of the output head in `head_dtype()` (`_full_head_loss`)."""
    import torch

    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    hidden = inner.model(**inputs, use_cache=False).last_hidden_state
    picked = hidden[positions[:, 0], positions[:, 1]]
    if vocab is None:
        return _full_head_loss()(picked, head, labels)
    logits = picked @ inner.lm_head.weight[vocab].T
    return torch.nn.functional.cross_entropy(logits.float(), torch.searchsorted(vocab, labels))


# oneDNN ISA caps (ONEDNN_MAX_CPU_ISA) under which bf16 products are emulated, not native.
_EMULATED_BF16_ISAS = {"SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE", "AVX512_CORE_VNNI"}


def head_dtype():
    """The judge phase's output-head dtype: bf16 where the CPU multiplies bf16 natively (AVX512_BF16 or
    AMX), else fp32. Measured, one thread, the head product (300 x 256 @ 256 x 151,936): AMX bf16
    0.16 s, AVX512_BF16 0.53 s, fp32 0.56 s; emulated bf16 1.6 s on AVX-512 without BF16 and 3.0 s on
    AVX2, where a bf16 head would stretch the first training from minutes to hours."""
    import os

    import torch

    from dfj.runtime.torch_packed import multiplies_bf16_natively

    native = multiplies_bf16_natively()
    capped = os.environ.get("ONEDNN_MAX_CPU_ISA", "").upper() in _EMULATED_BF16_ISAS
    return torch.bfloat16 if native and not capped else torch.float32


def cpu_class() -> str:
    """The class of CPU a trained build is a function of (training amplifies kernel differences): ATen's
    vector kernels (`avx512`, `avx2`, `default`…) and the bf16 matrix units the judge phase's head uses
    (`amx`, `bf16` for AVX512_BF16, `fp32` where neither is native or oneDNN is capped below them)."""
    import os

    import torch

    aten = torch.backends.cpu.get_cpu_capability().lower()
    if head_dtype() != torch.bfloat16:
        units = "fp32"
    elif torch.cpu._is_amx_tile_supported() and not os.environ.get("ONEDNN_MAX_CPU_ISA"):
        units = "amx"
    else:
        units = "bf16"
    return f"{aten}-{units}"


def _head_cross_entropy(hidden, head, labels):
    """Mean cross-entropy of `labels` under logits `hidden @ head.T`: the product in the head's dtype
    (bf16 where native, `head_dtype`), the softmax in fp32, as mixed-precision training does on GPUs."""
    import torch

    return torch.nn.functional.cross_entropy((hidden.to(head.dtype) @ head.T).float(), labels)


@functools.cache
def _full_head_loss():
    """`_head_cross_entropy`, compiled when a C++ compiler is present and ATen has vector kernels.

    The judge phase's cost is the 152k-token head at every target position: in eager mode the logits,
    their fp32 copy, the log-softmax and its gradient are each a pass over a 40M-element tensor. The
    compiled kernel fuses them and takes a pointwise step from about 1.3 s to 0.8 s on 2 CPU cores.
    Dynamic shapes: the number of target positions differs from batch to batch.
    """
    import torch

    # Where ATen runs its scalar kernels (no vector ISA, or ATEN_CPU_CAPABILITY=default), inductor still
    # emits vector code but builds it without the vector headers, and the compile fails (torch 2.14.1).
    vector_isa = torch.backends.cpu.get_cpu_capability() != "DEFAULT"
    if vector_isa and any(shutil.which(name) for name in ("g++", "c++", "clang++")):
        return torch.compile(_head_cross_entropy, dynamic=True)
    return _head_cross_entropy


def _schedule(step: int, total: int, warmup: int = 20) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


DESCRIBE = "Describe any manipulation artifact in the image, naming its type and region."
BASE_TASKS = ("describe", "find", "read")


def _base_example(rng: random.Random, task: str):
    """One pretraining example, (image, question, answer), for one of the base's three skills:
    describe the image's artifact (type and region); say whether an artifact of a named type is in
    the image; read which artifact type a detector response cites. The real base learned looking,
    grounding a phrase in the image and reading text in pretraining; a judge's LoRA only routes them.

    Half the looking questions come after a detector response about another image: the text between
    the image and the question varies, so the base must find the image by content, not by distance
    (in a judge prompt the image is 500 tokens back), and learns that a cited artifact is not a seen one.
    """
    scene = random_scene(rng)
    image = render_image(rng, scene)
    other = detector_response(rng, random_scene(rng), rng.randint(1, 5))
    if task == "read":
        return image, f"{other}\nWhich artifact type does this response cite?", f"{cited_artifact(other) or 'no'} artifact."
    preamble = other + "\n" if rng.random() < 0.5 else ""
    if task == "describe":
        if scene.artifact is None:
            answer = rng.choice(["No artifact: lighting and textures are consistent.", "The image is clean; no artifact is visible."])
        else:
            answer = f"There is {rng.choice(ARTIFACT_WORDS[scene.artifact])} in the {scene.region}."
        return image, preamble + DESCRIBE, answer
    asked = scene.artifact if scene.artifact and rng.random() < 0.5 else rng.choice(ARTIFACTS)
    return image, preamble + find_question(asked), "Yes." if asked == scene.artifact else "No."


def train_base(model, processor, settings: TrainSettings, log: Log = print, clock: TrainingClock | None = None) -> None:
    """Phase 1, from scratch: the vision tower and the transformer layers, on the pretraining tasks.

    Token embeddings and the output head keep their random initialisation (fixed random codes the
    layers learn to read and write), and the loss is a softmax over the tokens of the task only:
    both keep a 152k-row vocabulary from dominating the cost on CPU. The judge phase then trains
    against the full vocabulary.
    """
    import torch

    rng = random.Random(f"base-{settings.seed}")
    pool = [(image, prompts.render_chat(question), answer) for image, question, answer in
            (_base_example(rng, task) for task in BASE_TASKS for _ in range(settings.train_images))]
    tokenizer = processor.tokenizer
    task_text = [chat + answer for _, chat, answer in pool] + ["<|im_end|>"]
    vocab = torch.tensor(sorted({i for text in task_text for i in tokenizer(text)["input_ids"]}))
    inner = model.model.language_model
    inner.embed_tokens.weight.requires_grad_(False)
    model.lm_head.weight.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=settings.base_lr, weight_decay=0.0)
    model.train()
    started = time.perf_counter()
    # Each pooled example is drawn about 13 times: encoded once, on its first draw (the processor is
    # 0.05 s of a step; same batches, 12 s to 45 s faster in measured runs).
    encoded: dict[int, tuple] = {}
    pad = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    for step in range(settings.base_steps):
        picks = [rng.randrange(len(pool)) for _ in range(settings.base_batch)]
        for index in picks:
            if index not in encoded:
                image, chat, answer = pool[index]
                encoded[index] = _encode(processor, chat, answer + "<|im_end|>", image)
        inputs, positions, labels = _collate([encoded[index] for index in picks], pad)
        for group in optimizer.param_groups:
            group["lr"] = settings.base_lr * _schedule(step, settings.base_steps)
        loss = _loss(model, inputs, positions, labels, vocab)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        if clock:
            clock.advance(1)
        if step % 100 == 0 or step == settings.base_steps - 1:
            log(f"base step {step:4d} of {settings.base_steps} loss {loss.item():.4f} ({time.perf_counter() - started:.0f} s"
                f"{clock.left() if clock else ''})")
    inner.embed_tokens.weight.requires_grad_(True)
    model.lm_head.weight.requires_grad_(True)
    model.eval()


def train_judge(peft_model, processor, split_dir: Path, settings: TrainSettings, log: Log = print,
                clock: TrainingClock | None = None) -> None:
    """Phase 2: the LoRA only, on DFJ prompts and gold judge outputs from a DFJ split."""
    import torch

    split = read_split(split_dir)
    if split.errors:
        raise ValueError(f"training split has bad lines: {split.errors[:3]}")
    rng = random.Random(f"judge-{split.mode}-{settings.seed}")
    records = split.records
    unlabelled = [record.line for record in records if record.gold_text is None]
    if unlabelled:
        raise ValueError(f"training split lines without a gold judge output: {unlabelled[:5]}")
    images: dict[str, object] = {}
    params = [p for p in peft_model.parameters() if p.requires_grad]
    head = peft_model.get_base_model().lm_head.weight.detach().to(head_dtype())  # frozen: not a LoRA target
    lr = settings.judge_lr[split.mode]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    peft_model.train()
    started = time.perf_counter()
    total = settings.judge_steps[split.mode]
    for step in range(total):
        picks = [rng.randrange(len(records)) for _ in range(settings.judge_batch)]
        chats, targets, pils = [], [], []
        for index in picks:
            record = records[index]
            responses, gold = record.responses(), record.gold_text
            if split.mode == "pairwise" and rng.random() < 0.5:
                # Each pair in either order, the gold letter following its response: the judge must
                # compare the two, not learn a position.
                responses, gold = responses[::-1], _swapped_choice(gold)
            chats.append(prompts.render_chat(prompts.render(split.mode, record.label, *responses)))
            targets.append(gold + "<|im_end|>")
            if record.image not in images:
                images[record.image] = load_image(record.image)
            pils.append(images[record.image])
        # Not cached as the base phase does: most records are drawn once or twice (measured no faster).
        inputs, positions, labels = _batch(processor, chats, targets, pils)
        for group in optimizer.param_groups:
            group["lr"] = lr * _schedule(step, total)
        loss = _loss(peft_model, inputs, positions, labels, head=head)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        if clock:
            clock.advance(TrainingClock.JUDGE_STEP)
        if step % 50 == 0 or step == total - 1:
            log(f"{split.mode} judge step {step:4d} of {total} loss {loss.item():.4f} ({time.perf_counter() - started:.0f} s"
                f"{clock.left() if clock else ''})")
    peft_model.eval()


def _swapped_choice(gold: str) -> str:
    """The pairwise gold output with A and B exchanged."""
    verdict = parse_pairwise(gold)
    if not verdict.ok:
        raise ValueError(f"not a pairwise gold output: {gold!r}: {verdict.error}")
    return f"<answer>{'B' if verdict.choice == 'A' else 'A'}</answer>"


def _split_lines(split_dir: Path) -> dict[int, dict]:
    """The split's JSON lines by line number (as `Record.line`), for the field `read_split` leaves
    out: the synthetic builder's `meta`."""
    import json

    with open(Path(split_dir) / "data.jsonl", encoding="utf-8") as handle:
        return {number: json.loads(line) for number, line in enumerate(handle, start=1) if line.strip()}


# ----------------------------------------------------------------------------------------------
# The whole recipe, cached

TRAINED_VERSION = "11"  # bump when the data, model or recipe changes: cached judges are rebuilt
SPLIT_SHAPE = {  # (images, records per image) as the DFJ test sets: 5 responses / 10 pairs per image
    ("pointwise", "train"): (240, 5),
    ("pointwise", "test"): (40, 5),
    ("pairwise", "train"): (480, 10),  # one letter per example: more distinct pairs, not more passes
    # 1,000 pairs, not 200: only about a quarter of the pairs turn on the pixels, and 200 pairs left too
    # few of those to measure the control (v10 read 69 % on 36 of them; on the 252 here it is 52 %).
    ("pairwise", "test"): (100, 10),
}


def build_trained_judges(root: str | Path, settings: TrainSettings | None = None, log: Log = print) -> Path:
    """Train the base and both LoRA judges, evaluate them, and write everything under `root` atomically.

    Layout: base/, {mode}-adapter/ (names ../base), splits/{mode}/{train,test}/, metrics.json.
    """
    import json

    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration

    from dfj.artifact.staging import staged_folder
    from dfj.hf import quiet_transformers
    from dfj.manifest import Manifest, write_manifest
    from dfj.tiny.model import generation_config, tiny_config, with_lora, write_processor
    from dfj.tiny.synthetic import build_synthetic_split

    settings = settings or TrainSettings()
    if settings.threads:
        torch.set_num_threads(settings.threads)
    started = time.perf_counter()
    timings: dict[str, float] = {}
    clock = TrainingClock(settings)
    with staged_folder(root, overwrite=True) as work, quiet_transformers():
        for (mode, split), (images, per_image) in SPLIT_SHAPE.items():
            build_synthetic_split(work / "splits" / mode / split, mode, images, per_image,
                                  seed=settings.seed * 100 + (0 if split == "train" else 1))
        base_dir = work / "base"
        write_processor(base_dir)
        from transformers import AutoProcessor

        processor = AutoProcessor.from_pretrained(base_dir)
        torch.manual_seed(settings.seed)
        model = Qwen2_5_VLForConditionalGeneration(tiny_config()).to(torch.float32)
        model.generation_config = generation_config()
        t0 = time.perf_counter()
        train_base(model, processor, settings, log, clock)
        timings["base_s"] = time.perf_counter() - t0
        model.save_pretrained(base_dir)

        for mode in prompts.MODES:
            base = Qwen2_5_VLForConditionalGeneration.from_pretrained(base_dir, dtype=torch.float32)
            torch.manual_seed(settings.seed + 1)
            peft_model = with_lora(base, settings.lora_rank)
            t0 = time.perf_counter()
            train_judge(peft_model, processor, work / "splits" / mode / "train", settings, log, clock)
            timings[f"{mode}_judge_s"] = time.perf_counter() - t0
            adapter = work / f"{mode}-adapter"
            peft_model.save_pretrained(adapter)
            cfg_path = adapter / "adapter_config.json"
            cfg = json.loads(cfg_path.read_text())
            cfg["base_model_name_or_path"] = "../base"
            cfg_path.write_text(json.dumps(cfg, indent=2))
            write_manifest(adapter, Manifest.for_judge(
                mode, "adapter", {"kind": "dfj.tiny.training", "version": TRAINED_VERSION, "seed": settings.seed}))
        timings["train_total_s"] = time.perf_counter() - started
        metrics = {"timings": timings, "settings": settings.__dict__,
                   "machine": {"cpu_class": cpu_class(),
                               "aten_cpu_capability": torch.backends.cpu.get_cpu_capability(),
                               "head_dtype": str(head_dtype()).removeprefix("torch."), "threads": torch.get_num_threads()}}
        for mode in prompts.MODES:
            t0 = time.perf_counter()
            metrics[mode] = evaluate(work / f"{mode}-adapter", work / "splits" / mode / "test")
            timings[f"{mode}_eval_s"] = time.perf_counter() - t0
            clock.advance(TrainingClock.EVALUATION / len(prompts.MODES))
            log(f"{mode} evaluated{clock.left()}: {metrics[mode]['with_image']}")
        (work / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return Path(root)


def evaluate(judge_dir: Path, split_dir: Path) -> dict:
    """Quality of a judge on a synthetic split: with the image, and with the image blanked (flat grey,
    the control), on all records and on the records whose gold verdict depends on the pixels
    (`meta.needs_image`, written by the synthetic split builder); and each record's verdict."""
    from PIL import Image

    import dfj
    from dfj.bench.metrics import pairwise_quality, pointwise_quality

    judge = dfj.load_judge(str(judge_dir))
    split = read_split(split_dir)
    records = split.records
    meta = {number: line.get("meta", {}) for number, line in _split_lines(split_dir).items()}
    pointwise = split.mode == "pointwise"
    blank = [dict(image=Image.new("RGB", Image.open(r.image).size, (128, 128, 128)), label=r.label,
                  **({"response": r.response} if pointwise else {"response_a": r.response_a, "response_b": r.response_b}))
             for r in records]
    measure = pointwise_quality if pointwise else pairwise_quality
    golds = [r.gold_score if pointwise else r.gold_choice for r in records]
    # Each record's answer (score or letter), kept so a later run can check the cached numbers
    # against a fresh judgement.
    answers = {name: [v.score if pointwise else v.choice for v in judge.judge_many(inputs)]
               for name, inputs in (("with_image", records), ("blank_image", blank))}
    picked = [i for i, r in enumerate(records) if meta.get(r.line, {}).get("needs_image")]
    result = {name: measure(got, golds).to_dict() for name, got in answers.items()}
    result["needs_image"] = {name: measure([got[i] for i in picked], [golds[i] for i in picked]).to_dict()
                             for name, got in answers.items()}
    result["verdicts"] = answers
    return result
