"""The reference runtime: transformers Qwen2.5-VL on CPU (fp32/bf16) or CUDA (bf16).

On CPU a merged float32/bfloat16 judge's linear layers are packed for oneDNN once at load
(`dfj.runtime.torch_packed`; option `pack_weights`): same arithmetic, summed in another order.

Every processor output goes to the model: without `mm_token_type_ids` transformers 5 silently falls
back to 1-D positions and every logit after the image is wrong.
"""

from __future__ import annotations

from typing import Any

import torch
from PIL import Image

from dfj import hf
from dfj.images import PixelLimits
from dfj.runtime.base import Runtime
from dfj.sources import Source


class TorchRuntime(Runtime):
    name = "torch"

    def __init__(self, model, processor, device: str, limits: PixelLimits, packed: int = 0,
                 bf16: tuple[str, ...] = ()) -> None:
        self.model = model
        self.packed = packed  # linear layers packed for oneDNN (dfj.runtime.torch_packed)
        self.bf16 = bf16  # parts run in bfloat16 (TorchOptions.bf16)
        self.processor = processor
        self.device = device
        self.limits = limits
        self.context_length = int(model.config.get_text_config().max_position_embeddings)
        image_processor = processor.image_processor
        # The judge's pixel limits, not whatever the base checkpoint's processor file says.
        image_processor.size = {"shortest_edge": limits.min_pixels, "longest_edge": limits.max_pixels}
        self.chat = hf.ChatEncoder(processor)
        tokenizer = processor.tokenizer
        self.eos_ids = sorted({tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.convert_tokens_to_ids("<|endoftext|>")})
        self.pad_id = tokenizer.convert_tokens_to_ids("<|endoftext|>")

    @classmethod
    def load(cls, source: Source, device: str = "cpu", dtype: str | None = None, **options: Any) -> "TorchRuntime":
        """Options: `dfj.runtime.options.TorchOptions` (`limits`, `pack_weights`, `bf16`)."""
        from dfj.runtime.options import TorchOptions

        opts = TorchOptions.parse("torch", options)
        limits = opts.limits
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise RuntimeError("device='cuda' was asked for, but torch sees no CUDA device")
        torch_dtype = hf.torch_dtype(dtype, device)
        with hf.quiet_transformers():
            if source.kind == "adapter":
                # Unmerged base + adapter: the judge exactly as trained, the reference for merges.
                base = hf.load_model(source.base, dtype=torch_dtype, device=device)
                model = hf.apply_adapter(base, source.path).eval()
                processor_dir = source.base
            else:
                model = hf.load_model(source.path, dtype=torch_dtype, device=device)
                processor_dir = source.path
            processor = hf.load_processor(processor_dir)
        limits = limits or source.limits
        _bf16_parts(model, device, opts.bf16)
        return cls(model, processor, device, limits, packed=_pack(model, source, device, opts.pack_weights), bf16=opts.bf16)

    # -- inputs ---------------------------------------------------------------------------------
    def encode_ids(self, image: Image.Image, ids) -> dict[str, torch.Tensor]:
        inputs = self.chat.encode_ids(image, ids)
        return {k: v.to(self.device) for k, v in inputs.items()}

    def tokenize(self, text: str, special: bool) -> list[int]:
        return self.chat.tokenize_as(text, special)

    def decode(self, ids) -> str:
        return self.processor.tokenizer.decode(list(ids), skip_special_tokens=True)

    # -- work (dfj/runtime/torch_cache.py: vision cache, head KV reuse, batched groups) -------------------
    @property
    def cached(self):
        if getattr(self, "_cached", None) is None:
            from dfj.runtime.torch_cache import CachedForward

            self._cached = CachedForward(self)
        return self._cached

    @property
    def seconds(self) -> dict[str, float]:
        return self.cached.seconds

    def generate(self, prompts, max_new_tokens: int, stop: str | None = None, cancel=None) -> list:
        return self.cached.generate_many(list(prompts), max_new_tokens, self.eos_ids, stop, cancel)

    def score(self, prompts, scorings) -> list:
        from dfj.runtime.base import Scores

        if len(prompts) != len(scorings):
            raise ValueError(f"{len(prompts)} prompts but {len(scorings)} scorings")
        logits = self.cached.teacher_forced_many(list(prompts), [list(s.forced) for s in scorings])
        out: list = []
        for result, scoring in zip(logits, scorings):
            out.append(result if isinstance(result, Exception)
                       else Scores.from_logprobs(torch.log_softmax(result.float(), dim=-1), scoring))
        return out

    @torch.inference_mode()
    def embed_images(self, prompts) -> list:
        from dfj.runtime.base import each

        def embed(prompt):
            features, _ = self.cached._image_features(self.encode_ids(prompt.image, prompt.ids))
            return features.float().cpu().numpy()

        return each(list(prompts), embed)

    @torch.inference_mode()
    def reference_generate(self, prompt, max_new_tokens: int) -> list[int]:
        """transformers' own `generate` on one prompt, no caches: the DFJ reference scripts' path, the
        baseline of `benchmarks.speed` and of the tests of the cached path."""
        from transformers import GenerationConfig

        inputs = self.encode_ids(prompt.image, prompt.ids)
        config = GenerationConfig(
            max_new_tokens=max_new_tokens,
            do_sample=False,  # greedy, whatever the checkpoint's generation_config.json says
            num_beams=1,
            repetition_penalty=1.0,
            eos_token_id=self.eos_ids,
            pad_token_id=self.pad_id,
        )
        with hf.quiet_transformers():  # the checkpoint's sampling flags are overridden on purpose
            output = self.model.generate(**inputs, generation_config=config)
        ids = output[0, inputs["input_ids"].shape[1]:].tolist()
        return ids[:-1] if ids and ids[-1] in self.eos_ids else ids

    def describe(self) -> dict[str, Any]:
        import torch

        from dfj.version import package_version

        described = {"runtime": self.name, "device": self.device, "dtype": str(self.model.get_input_embeddings().weight.dtype),
                     "packed_linears": self.packed, "torch": torch.__version__, "transformers": package_version("transformers")}
        if self.bf16:
            described["bf16_parts"] = list(self.bf16)
        if self.device == "cpu":  # the kernels that decide the arithmetic (thread count is left out: docs/provenance.md)
            described["cpu_kernels"] = torch.backends.cpu.get_cpu_capability()
        return described


class Bf16Head(torch.nn.Module):
    """The output projection of a float32 model in bfloat16: hidden states cast down, logits back up."""

    def __init__(self, linear: torch.nn.Linear) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(linear.in_features, linear.out_features, bias=linear.bias is not None,
                                      dtype=torch.bfloat16)
        with torch.no_grad():
            self.linear.weight.copy_(linear.weight)  # a copy: a tied embedding stays float32
            if linear.bias is not None:
                self.linear.bias.copy_(linear.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.linear(hidden.to(torch.bfloat16)).float()


def _bf16_parts(model, device: str, parts: tuple[str, ...]) -> None:
    """Run `parts` of a float32 model in bfloat16 (TorchOptions.bf16), or say why not."""
    if not parts:
        return
    if device != "cpu":
        raise ValueError(f"bf16 parts are for the CPU runtime; on {device} the whole judge runs in bf16 (dtype)")
    if next(model.parameters()).dtype != torch.float32:
        raise ValueError("bf16 parts are for a float32 judge")
    from dfj.runtime.torch_packed import multiplies_bf16_natively

    if not multiplies_bf16_natively():
        raise ValueError("this CPU multiplies bf16 only by emulation (no AMX, no AVX512_BF16): bf16 parts would be "
                         "slower than float32, not faster")
    if "vision" in parts:
        model.model.visual.to(torch.bfloat16)  # its patch embedding casts the pixels to its own dtype
    if "head" in parts:
        model.lm_head = Bf16Head(model.lm_head)


def _pack(model, source: Source, device: str, wanted: bool | None) -> int:
    """Pack the model's linear layers for oneDNN where `wanted` (None: where it can); how many were."""
    if wanted is False:
        return 0
    from dfj.runtime.torch_packed import pack_linears, why_not_packable

    # An unmerged adapter stays as peft built it: its layers read their weights on every call, and it
    # is the reference that merges are checked against.
    reason = "an unmerged adapter judge is not packed; export it first" if source.kind == "adapter" else None
    reason = reason or why_not_packable(model, device)
    if reason:
        if wanted:
            raise ValueError(f"pack_weights=True: {reason}")
        return 0
    return pack_linears(model)
