"""The runtime contract every backend implements, in tokens and batch-first.

A runtime receives prepared prompts (`Prompt`: the image, fitted to the judge's grid, and token ids
with the image block as one `<|image_pad|>`) and offers three calls over a list of them: greedy
generation, scoring of forced continuations, and the image embeddings it feeds the language model
(which `dfj bench` compares with the reference's, so damage to the vision tower shows). Each call answers one result or one exception per
prompt, in order, so one bad prompt never loses the others. What a runtime may reuse between prompts
(image encodings, the KV state of a shared token prefix) it keys by pixels and token ids and keeps
to itself. Prompts, the chat layout, parsing and records live in `dfj.judge`, once for every runtime.

A new runtime implements six methods: `load`, `tokenize`, `decode`, `generate`, `score`, `embed_images`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Callable, Sequence

import numpy as np
from PIL import Image

from dfj import prompts
from dfj.images import PixelLimits

IMAGE_PAD = "<|image_pad|>"


@dataclass(frozen=True)
class Prompt:
    """One prepared prompt. `ids` holds the image block once (`<|vision_start|><|image_pad|><|vision_end|>`,
    the pad not expanded); the first `head` ids are shared with the other prompts of its group (same
    image and label), which a runtime may compute once."""

    image: Image.Image
    ids: tuple[int, ...]
    head: int = 0

    def __post_init__(self) -> None:
        if not 0 <= self.head < len(self.ids):
            raise ValueError(f"head {self.head} must leave at least one of the prompt's {len(self.ids)} ids to run")

    @cached_property
    def image_key(self) -> str:
        """The image's identity for caches: a digest of its pixels and size."""
        import hashlib

        rgb = np.ascontiguousarray(np.asarray(self.image.convert("RGB"), dtype=np.uint8))
        return hashlib.sha256(rgb.tobytes()).hexdigest() + f":{self.image.width}x{self.image.height}"


@dataclass(frozen=True)
class Scoring:
    """A continuation forced after a prompt, and what to read at each of its positions (row i predicts
    `forced[i]`): the log-probabilities of `tokens`, the `top_k` most likely ids, or (`full`) whole rows."""

    forced: tuple[int, ...]
    tokens: tuple[int, ...] = ()
    top_k: int = 0
    full: bool = False

    def __post_init__(self) -> None:
        if not self.forced:
            raise ValueError("a scoring needs at least one forced id")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, not {self.top_k}")


@dataclass
class Scores:
    """What a `Scoring` asked for, float32 log-probabilities, one row per forced position."""

    tokens: np.ndarray  # (n, len(scoring.tokens))
    top_ids: np.ndarray  # (n, top_k) int64, most likely first
    top_logprobs: np.ndarray  # (n, top_k)
    rows: np.ndarray | None = None  # (n, vocab) when scoring.full

    @classmethod
    def from_logprobs(cls, logprobs: Any, scoring: Scoring) -> "Scores":
        """Select from a (n, vocab) log-probability matrix (a torch tensor, selected where it lives, or an
        array): only what was asked for is copied out; whole rows only when `scoring.full`."""
        if hasattr(logprobs, "detach"):  # torch: select on the device, copy the selection
            import torch

            top = torch.topk(logprobs, scoring.top_k, dim=-1) if scoring.top_k else None
            picked = logprobs[:, list(scoring.tokens)] if scoring.tokens else logprobs[:, :0]
            to_numpy = lambda t: t.detach().cpu().numpy()  # noqa: E731
            return cls(tokens=to_numpy(picked.float()),
                       top_ids=to_numpy(top.indices) if top is not None else np.zeros((len(logprobs), 0), dtype=np.int64),
                       top_logprobs=to_numpy(top.values.float()) if top is not None else np.zeros((len(logprobs), 0), np.float32),
                       rows=to_numpy(logprobs.float()) if scoring.full else None)
        rows = np.asarray(logprobs, dtype=np.float32)
        if scoring.top_k:
            part = np.argpartition(-rows, scoring.top_k - 1, axis=-1)[:, : scoring.top_k]
            order = np.argsort(-np.take_along_axis(rows, part, axis=-1), axis=-1, kind="stable")
            top_ids = np.take_along_axis(part, order, axis=-1).astype(np.int64)
        else:
            top_ids = np.zeros((len(rows), 0), dtype=np.int64)
        return cls(tokens=rows[:, list(scoring.tokens)], top_ids=top_ids,
                   top_logprobs=np.take_along_axis(rows, top_ids, axis=-1), rows=rows if scoring.full else None)


Result = Any  # list[int] (generate) or Scores (score), or the Exception that item raised
Cancel = Callable[[], bool]  # polled by `generate` between decode steps: True means nobody waits any more


class Cancelled(Exception):
    """The caller gave up on a generation (`cancel()` turned true): the result of each prompt it stopped."""

    def __init__(self) -> None:
        super().__init__("cancelled: nobody waits for this verdict any more")


def check_cancel(cancel: Cancel | None) -> None:
    if cancel is not None and cancel():
        raise Cancelled()


class Runtime(ABC):
    """Runs one judge model on prepared prompts."""

    name: str = ""
    limits: PixelLimits
    context_length: int | None = None  # prompt + output tokens the model takes; None: unchecked

    @classmethod
    @abstractmethod
    def load(cls, source: Any, device: str, dtype: str | None, **options: Any) -> "Runtime":
        """Build the runtime from a resolved `dfj.sources.Source`."""

    @abstractmethod
    def tokenize(self, text: str, special: bool) -> list[int]:
        """Token ids of `text`, no image expansion. `special=True` (the chat template's text, a judge's
        own output): special-token strings are control tokens. `special=False` (the label and the
        detector's responses, untrusted): they are ordinary characters, never control tokens."""

    @abstractmethod
    def decode(self, ids: Sequence[int]) -> str:
        """Text of generated ids, special tokens removed."""

    @abstractmethod
    def generate(self, prompts: Sequence[Prompt], max_new_tokens: int, stop: str | None = None,
                 cancel: Cancel | None = None) -> list[Result]:
        """Greedy continuation ids of each prompt (end-of-turn token not included), ending early once
        the decoded text ends with `stop`; an exception in the place of a prompt that failed. `cancel`,
        when given, is polled before each prefill and decode step: once it is true, every prompt not yet
        finished gets `Cancelled` in its place and no more work is done for it."""

    @abstractmethod
    def score(self, prompts: Sequence[Prompt], scorings: Sequence[Scoring]) -> list[Result]:
        """`Scores` of each (prompt, scoring) pair; an exception in the place of a pair that failed."""

    @abstractmethod
    def embed_images(self, prompts: Sequence[Prompt]) -> list[Result]:
        """The embeddings of each prompt's image as the language model receives them: a float32 array
        (image tokens, hidden size), the rows in the order of the prompt's image tokens; an exception
        in the place of a prompt that failed."""

    def describe(self) -> dict[str, Any]:
        return {"runtime": self.name}

    def close(self) -> None:
        """Free native resources now (they are also freed when the runtime is collected)."""


# -- helpers every runtime and caller shares ----------------------------------------------------------
def chat_ids(chat: str, tokenize: Callable[[str, bool], list[int]]) -> list[int]:
    """Token ids of a chat made by `prompts.render_chat` (plus any trusted continuation appended): the
    template's text with its control tokens, the user's prompt as plain text."""
    head, prompt, rest = prompts.split_chat(chat)
    return tokenize(head, True) + tokenize(prompt, False) + tokenize(rest, True)


def each(items: Sequence[Any], work: Callable[[Any], Any]) -> list[Result]:
    """`work` on each item, an item's exception in its place: one failure never loses the others."""
    results: list[Result] = []
    for item in items:
        try:
            results.append(work(item))
        except Exception as exc:  # noqa: BLE001 - reported per item, in order
            results.append(exc)
    return results


def by_group(items: Sequence[Any], batched: Callable[[list], list[Result]], alone: Callable[[Any], Any],
             prompt_of: Callable[[Any], Prompt] = lambda item: item, size: int | None = None) -> list[Result]:
    """Results of `items` in order: `batched` on each group of items whose prompts share image and head
    (`groups_by_head`; cut into parts of at most `size`), `alone` on an item without company. A group
    that fails runs again one item at a time, so a bad item carries its own error and costs the others
    nothing; a cancelled group is not rerun (every item gets the `Cancelled`)."""
    outputs: list[Result] = [None] * len(items)
    for found in groups_by_head([prompt_of(item) for item in items]):
        for start in range(0, len(found), size or len(found)):
            indices = found[start:start + size] if size else found
            group = [items[i] for i in indices]
            if len(group) == 1:
                results = each(group, alone)
            else:
                try:
                    results = batched(group)
                except Cancelled as exc:
                    results = [exc] * len(group)
                except Exception:  # noqa: BLE001 - e.g. one bad prompt in the group: find it, keep the others
                    results = each(group, alone)
            for index, result in zip(indices, results):
                outputs[index] = result
    return outputs


def generation_done(ids: Sequence[int], max_new_tokens: int, stop: str | None, decode: Callable[[Sequence[int]], str]) -> bool:
    """Whether greedy generation of `ids` stops here: `max_new_tokens` reached, or the decoded text ends
    with `stop` (the end-of-turn token is each runtime's own check, before the id is appended)."""
    return len(ids) >= max_new_tokens or bool(stop) and decode(ids).endswith(stop)


def groups_by_head(prompts: Sequence[Prompt]) -> list[list[int]]:
    """Indices of prompts sharing image and head ids, in first-seen order (a runtime runs each group's
    head once); a prompt with no head is a group of its own."""
    from collections import OrderedDict

    found: OrderedDict[Any, list[int]] = OrderedDict()
    for index, prompt in enumerate(prompts):
        key = (prompt.image_key, prompt.ids[: prompt.head]) if prompt.head else ("alone", index)
        found.setdefault(key, []).append(index)
    return list(found.values())
