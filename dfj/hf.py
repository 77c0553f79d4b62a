"""Hugging Face Qwen2.5-VL checkpoints: strict loading, LoRA adapters and their key layouts.

Shared by the torch runtime and the exporters. Two failure modes of the stack are closed here:
transformers fills missing weights with random values (a DFJ checkpoint without `lm_head` would judge
garbage), and peft loads an adapter whose keys do not match the model with only a warning (the
pre-transformers-5 layout then changes nothing). Both are errors here.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import re
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import Any

from dfj.manifest import ArtifactError

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"

# Adapter keys written against transformers < 5 (Qwen2_5_VLForConditionalGeneration held the text
# model at `.model` and the tower at `.visual`) -> the transformers 5 module names. Applied by peft
# after it strips the `base_model.model.` prefix.
LEGACY_ADAPTER_KEY_MAPPING = {
    r"^model\.(?!language_model\.|visual\.)": "model.language_model.",
    r"^visual\.": "model.visual.",
}
_LEGACY_KEY = re.compile(r"^base_model\.model\.(model\.(layers|embed_tokens|norm)\.|visual\.)")


def torch_dtype(name: str | None, device: str):
    """'float32' / 'bfloat16' / 'float16' / None (fp32 on CPU, bf16 on CUDA) -> torch dtype."""
    import torch

    if name in (None, "auto"):
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if name not in table:
        raise ValueError(f"unknown dtype {name!r}: expected float32, bfloat16 or float16")
    return table[name]


def checkpoint_dtype(folder: Path) -> str:
    """The dtype the checkpoint's config records (transformers 5 `dtype`, older `torch_dtype`)."""
    config = json.loads((Path(folder) / "config.json").read_text())
    value = config.get("dtype") or config.get("torch_dtype") or config.get("text_config", {}).get("dtype")
    return str(value or "float32")


def load_model(folder: Path, dtype=None, device: str = "cpu", *, offload_folder: Path | None = None):
    """Load a Qwen2.5-VL checkpoint; refuse it if any weight the model needs is missing from it.

    With `offload_folder` (CPU only), the big layers (vision blocks, decoder layers, embedding, head)
    stay on disk and accelerate's hooks read each one in when the forward reaches it, from the
    checkpoint's own safetensors where the dtype matches (else from copies in `offload_folder`): a
    forward then holds about one layer, however deep the model.
    """
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration

    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise ArtifactError(f"{folder}: no config.json; not a model folder")
    if not any(folder.glob("*.safetensors")):
        raise ArtifactError(f"{folder}: no .safetensors weights (pickle checkpoints are never loaded)")
    extra: dict[str, Any] = {}
    if offload_folder is not None:
        if device != "cpu":
            raise ValueError("layers streamed from disk need device='cpu'")
        extra.update(device_map=streamed_device_map(folder), offload_folder=str(offload_folder))
    quantization = json.loads((folder / "config.json").read_text()).get("quantization_config") or {}
    if quantization.get("quant_method") == "gptq":
        extra["quantization_config"] = gptq_load_config(quantization, device)
    with warnings.catch_warnings():
        # For GPTQ, the checkpoint's own quantization settings are kept; only the kernel is chosen here.
        warnings.filterwarnings("ignore", message="You passed `quantization_config`")
        model, info = Qwen2_5_VLForConditionalGeneration.from_pretrained(
            folder,
            dtype=dtype if dtype is not None else torch.float32,
            use_safetensors=True,
            output_loading_info=True,
            local_files_only=True,
            **extra,
        )
    missing = sorted(info.get("missing_keys") or [])
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise ArtifactError(f"{folder}: checkpoint is missing weights the model needs: {shown}")
    mismatched = info.get("mismatched_keys") or []
    if mismatched:
        raise ArtifactError(f"{folder}: checkpoint weights have the wrong shape: {mismatched[:3]}")
    return (model if offload_folder is not None else model.to(device)).eval()


def streamed_device_map(folder: Path) -> dict[str, str]:
    """accelerate device map that leaves every big module on disk and the small glue in memory (the
    hooks need one module on the CPU to know where to run)."""
    import torch
    from accelerate import init_empty_weights
    from transformers import AutoConfig, Qwen2_5_VLForConditionalGeneration

    with init_empty_weights():
        model = Qwen2_5_VLForConditionalGeneration._from_config(AutoConfig.from_pretrained(folder, local_files_only=True))
    device_map: dict[str, str] = {}
    for prefix, container in (("model.visual", model.model.visual), ("model.language_model", model.model.language_model)):
        for name, child in container.named_children():
            if isinstance(child, torch.nn.ModuleList):
                device_map.update({f"{prefix}.{name}.{i}": "disk" for i in range(len(child))})
            else:
                device_map[f"{prefix}.{name}"] = "disk" if name == "embed_tokens" else "cpu"
    device_map["lm_head"] = "disk"
    return device_map


def prepare_gptqmodel() -> None:
    """Before GPTQModel is imported: size its CPU worker pool (left unset on a 2-core host it crashes)
    and keep its per-layer INFO tables out of dfj's output."""
    import logging
    import os

    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(max(1, min(os.cpu_count() or 1, 8))))
    logging.getLogger("logbar").setLevel(logging.WARNING)


def gptq_load_config(quantization: dict[str, Any], device: str):
    """transformers' GPTQConfig for loading a GPTQ checkpoint: the pure-torch kernel on CPU (no kernel
    compilation on a 2-core host), whatever fast kernel the stack picks on CUDA."""
    prepare_gptqmodel()
    from transformers import GPTQConfig

    backend = "auto" if device.startswith("cuda") else "gptq_torch"
    return GPTQConfig(bits=int(quantization.get("bits", 4)), group_size=int(quantization.get("group_size", 128)),
                      desc_act=bool(quantization.get("desc_act", False)), sym=bool(quantization.get("sym", True)),
                      backend=backend)


def read_adapter_config(folder: Path) -> dict[str, Any]:
    path = Path(folder) / ADAPTER_CONFIG
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ArtifactError(f"{path}: unreadable adapter config ({exc})") from None


def adapter_key_layout(folder: Path) -> str:
    """'legacy' for pre-transformers-5 keys (`base_model.model.model.layers.*`), else 'peft'."""
    from safetensors import safe_open

    with safe_open(Path(folder) / ADAPTER_WEIGHTS, "np") as handle:
        keys = list(handle.keys())
    return "legacy" if any(_LEGACY_KEY.match(k) for k in keys) else "peft"


@contextlib.contextmanager
def peft_without_gptq_probe():
    """peft imports GPTQModel (5 s, a banner, process-wide env changes) to ask whether each layer is a
    GPTQ layer whenever GPTQModel is installed. A GPTQ layer can only exist once GPTQModel is imported,
    so until then the answer is no without importing it."""
    import sys

    if "gptqmodel" in sys.modules:
        yield
        return
    import peft.tuners.lora.awq as awq
    import peft.tuners.lora.gptq as gptq
    import peft.utils.other as other

    modules = (awq, gptq, other)
    saved = [m.is_gptqmodel_available for m in modules]
    for module in modules:
        module.is_gptqmodel_available = lambda: False
    try:
        yield
    finally:
        for module, original in zip(modules, saved):
            module.is_gptqmodel_available = original


def apply_adapter(model, adapter_dir: Path):
    """Wrap `model` with the LoRA adapter, mapping legacy keys; prove every adapter tensor landed and
    that the adapter changes the model. Returns the PeftModel."""
    import torch
    from peft import PeftModel
    from safetensors.torch import load_file

    adapter_dir = Path(adapter_dir)
    weights = adapter_dir / ADAPTER_WEIGHTS
    if not weights.is_file():
        raise ArtifactError(f"{adapter_dir}: no {ADAPTER_WEIGHTS} (pickled adapter_model.bin is never loaded)")
    config = read_adapter_config(adapter_dir)
    if config.get("peft_type", "LORA") != "LORA":
        raise ArtifactError(f"{adapter_dir}: only LoRA adapters are supported, not {config.get('peft_type')}")
    layout = adapter_key_layout(adapter_dir)
    mapping = LEGACY_ADAPTER_KEY_MAPPING if layout == "legacy" else None
    with peft_without_gptq_probe():
        peft_model = PeftModel.from_pretrained(model, adapter_dir, key_mapping=mapping, is_trainable=False)

    # Every tensor in the file must have landed in a LoRA parameter of the model, value for value.
    saved = load_file(weights)
    params = dict(peft_model.named_parameters())
    unmatched = []
    for key, tensor in saved.items():
        name = _model_param_name(key, mapping)
        param = params.get(name)
        if param is None or param.shape != tensor.shape or not torch.equal(param.detach().cpu().to(tensor.dtype), tensor):
            unmatched.append(key)
    if unmatched:
        raise ArtifactError(
            f"{adapter_dir}: {len(unmatched)} of {len(saved)} adapter tensors did not load into the model "
            f"(key layout {layout}; first: {unmatched[0]})"
        )
    if not any(("lora_B" in k or "lora_A" in k) for k in saved) or all(
        float(t.abs().max()) == 0.0 for k, t in saved.items() if "lora_B" in k
    ):
        raise ArtifactError(f"{adapter_dir}: the adapter changes nothing (every LoRA B matrix is zero)")
    return peft_model


def _model_param_name(key: str, mapping: dict[str, str] | None) -> str:
    prefix = "base_model.model."
    inner = key[len(prefix):] if key.startswith(prefix) else key
    for pattern, replacement in (mapping or {}).items():
        inner, count = re.subn(pattern, replacement, inner)
        if count:
            break
    # peft inserts the adapter name before `.weight`: lora_A.weight -> lora_A.default.weight
    inner = re.sub(r"\.(lora_A|lora_B|lora_embedding_A|lora_embedding_B)\.", r".\1.default.", inner)
    if inner.endswith(("lora_embedding_A", "lora_embedding_B")):
        inner += ".default"
    return prefix + inner


@contextlib.contextmanager
def quiet_transformers():
    """Silence transformers' per-load progress bars and reports; errors still raise."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            # peft calls a transformers API that transformers 5 deprecated; not actionable here.
            warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated")
            yield
    finally:
        hf_logging.set_verbosity(level)
        hf_logging.enable_progress_bar()


# The files AutoProcessor reads for a Qwen2.5-VL processor (a model's weights and configs are not
# among them, so every artifact of one judge shares its processor's key).
PROCESSOR_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json",
                   "added_tokens.json", "chat_template.json", "chat_template.jinja", "processor_config.json",
                   "preprocessor_config.json", "video_preprocessor_config.json")
_PROCESSORS: OrderedDict[str, Any] = OrderedDict()
_PLAIN_TOKENIZERS: OrderedDict[int, tuple[Any, Any, frozenset[int]]] = OrderedDict()
CACHED_PROCESSORS = 4


def load_processor(folder: Path):
    """`AutoProcessor.from_pretrained(folder)`, read once per process for the same files: an export and
    its probes load the same tokenizer a dozen times, 0.75 s each for Qwen2.5's. Each call gets its own
    image processor (its runtime sets it to its pixel limits); the tokenizer, which dfj never changes,
    is shared."""
    digest = hashlib.sha256()
    for name in PROCESSOR_FILES:
        path = Path(folder) / name
        if path.is_file():
            digest.update(name.encode() + b"\0" + path.read_bytes() + b"\0")
    key = digest.hexdigest()
    loaded = _PROCESSORS.get(key)
    if loaded is None:
        from transformers import AutoProcessor

        with quiet_transformers():
            loaded = AutoProcessor.from_pretrained(folder, local_files_only=True)
        _PROCESSORS[key] = loaded
        while len(_PROCESSORS) > CACHED_PROCESSORS:
            _PROCESSORS.popitem(last=False)
    _PROCESSORS.move_to_end(key)
    processor = copy.copy(loaded)
    processor.image_processor = copy.deepcopy(loaded.image_processor)
    return processor


# Added tokens that are chat or media structure: those marked special, and every `<|…|>`-shaped one
# (llama.cpp's rule: Qwen2.5's `<|fim_prefix|>` … `<|file_sep|>` are added tokens not marked special,
# which llama.cpp makes control tokens on load). Text from a detector never becomes one of them.
_CONTROL_SHAPE = re.compile(r"<\|[^\s|]+\|>")


def is_control_token(content: str, special: bool) -> bool:
    return special or bool(_CONTROL_SHAPE.fullmatch(content))


class ChatEncoder:
    """Tokenizes a chat made by `dfj.prompts.render_chat` for a Qwen2.5-VL processor.

    The chat template's own text keeps its control tokens; the user's prompt (label and detector
    responses) is tokenized as plain text by a copy of the tokenizer that treats every control token
    as special and special-token strings as ordinary text. Text between control tokens is tokenized
    on its own either way, so a prompt without such strings gets exactly the ids the processor gives
    the whole chat.
    """

    def __init__(self, processor) -> None:
        from tokenizers import Tokenizer

        self.processor = processor
        tokenizer = processor.tokenizer
        # Built once per tokenizer object (processors from `load_processor` share theirs): 0.6 s each.
        known = _PLAIN_TOKENIZERS.get(id(tokenizer))
        if known is None or known[0] is not tokenizer:
            spec = json.loads(tokenizer.backend_tokenizer.to_str())
            for added in spec["added_tokens"]:
                added["special"] = is_control_token(added["content"], added["special"])
            plain = Tokenizer.from_str(json.dumps(spec))
            plain.encode_special_tokens = True
            known = (tokenizer, plain, frozenset(a["id"] for a in spec["added_tokens"] if a["special"]))
            _PLAIN_TOKENIZERS[id(tokenizer)] = known  # holds the tokenizer, so its id is not reused
            while len(_PLAIN_TOKENIZERS) > CACHED_PROCESSORS:
                _PLAIN_TOKENIZERS.popitem(last=False)
        _, self.plain, self.control_ids = known
        self.image_pad_id = tokenizer.convert_tokens_to_ids("<|image_pad|>")
        # The chat head (ending with the image block) is the same for every call: its token count once.
        from dfj.prompts import render_chat, split_chat

        self.head_tokens = len(self.tokenize(split_chat(render_chat(""))[0]))

    def tokenize(self, text: str) -> list[int]:
        """Trusted text (the template's): special-token strings are control tokens."""
        return self.processor.tokenizer(text, add_special_tokens=False)["input_ids"]

    def tokenize_plain(self, text: str) -> list[int]:
        """Untrusted text: special-token strings are ordinary characters."""
        return self.plain.encode(text, add_special_tokens=False).ids

    def tokenize_as(self, text: str, special: bool) -> list[int]:
        return self.tokenize(text) if special else self.tokenize_plain(text)

    def encode_ids(self, image, ids) -> dict[str, Any]:
        """Every model input for a prepared prompt: its one image pad expanded to the image's tokens,
        the pixels from the processor's image processor, and the token types transformers needs."""
        import torch

        from dfj.prompts import image_block

        at = image_block(ids, self.image_pad_id)
        pixels = self.processor.image_processor(images=[image], return_tensors="pt")
        merge = self.processor.image_processor.merge_size
        count = int(pixels["image_grid_thw"].prod()) // (merge * merge)
        expanded = list(ids[:at]) + [self.image_pad_id] * count + list(ids[at + 1:])
        input_ids = torch.tensor([expanded], dtype=torch.long)
        types = (input_ids == self.image_pad_id).long()
        return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "mm_token_type_ids": types,
                "pixel_values": pixels["pixel_values"], "image_grid_thw": pixels["image_grid_thw"]}

    def encode(self, image, chat: str) -> dict[str, Any]:
        """Every processor output for (image, chat text), the prompt's ids spliced in as plain text: the
        processor's own way, kept as the reference that the prepared-ids path (`encode_ids`, what the
        runtimes run) is tested against."""
        import torch

        from dfj.prompts import split_chat

        head, prompt, rest = split_chat(chat)
        inputs = self.processor(text=[head + rest], images=[image], return_tensors="pt")
        ids = inputs["input_ids"]
        # head ends with the image block: its tokens are head's, the one pad expanded to the image's.
        at = self.head_tokens - 1 + int((ids[0] == self.image_pad_id).sum())
        plain = torch.tensor([self.tokenize_plain(prompt)], dtype=ids.dtype)
        spliced = {"input_ids": plain, "attention_mask": torch.ones_like(plain), "mm_token_type_ids": torch.zeros_like(plain)}
        out = dict(inputs)
        for key, middle in spliced.items():
            if key in inputs:
                out[key] = torch.cat([inputs[key][:, :at], middle.to(inputs[key].dtype), inputs[key][:, at:]], dim=1)
        return out
