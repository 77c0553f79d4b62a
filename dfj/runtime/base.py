"""The runtime interface every backend implements: token ids in, token ids and log-probabilities out.

Text-level helpers (`generate`, `logprobs`) are defined here once on top of the token-level methods.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import numpy as np
from PIL import Image

from dfj import prompts
from dfj.images import PixelLimits


class Runtime(ABC):
    """Runs one judge model. Inputs are already validated: an RGB image and the full chat text."""

    name: str = ""
    limits: PixelLimits
    context_length: int | None = None  # prompt + output tokens the model takes; None: unchecked

    @classmethod
    @abstractmethod
    def load(cls, source: Any, device: str, dtype: str | None, **options: Any) -> "Runtime":
        """Build the runtime from a resolved `dfj.sources.Source`."""

    @abstractmethod
    def tokenize(self, text: str) -> list[int]:
        """Token ids of trusted text (the template's, or a judge's own output): special-token strings are
        control tokens; no image expansion."""

    @abstractmethod
    def tokenize_plain(self, text: str) -> list[int]:
        """Token ids of untrusted text (the user's prompt: label and detector responses): special-token
        strings are ordinary characters, never control tokens."""

    def tokenize_chat(self, chat: str) -> list[int]:
        """Token ids of a chat made by `prompts.render_chat`, its one image pad not expanded: the
        template's text with its control tokens, the user's prompt as plain text."""
        head, prompt, rest = prompts.split_chat(chat)
        return self.tokenize(head) + self.tokenize_plain(prompt) + self.tokenize(rest)

    @abstractmethod
    def prompt_ids(self, image: Image.Image, chat: str) -> list[int]:
        """The token ids this runtime runs for (image, chat), each image token as `<|image_pad|>`."""

    @abstractmethod
    def decode(self, ids: list[int]) -> str:
        """Text of generated ids, special tokens removed."""

    @abstractmethod
    def generate_ids(self, image: Image.Image, chat: str, max_new_tokens: int) -> list[int]:
        """Greedy continuation of `chat`, without the stop token."""

    @abstractmethod
    def logprobs_ids(self, image: Image.Image, chat: str, ids: list[int]) -> np.ndarray:
        """(len(ids), vocab) float32 log-probabilities of each position, teacher-forced on `ids`."""

    # -- fast path: runtimes that can reuse work across records override these ----------------------
    def generate_ids_cached(self, image: Image.Image, chat: str, max_new_tokens: int, prefix_chars: int | None,
                            stop: str | None = None) -> list[int]:
        """As `generate_ids`; `chat[:prefix_chars]` is shared by other records of the same image and
        label and may be served from a cache; generation may end early at `stop`."""
        return self.generate_ids(image, chat, max_new_tokens)

    def generate_ids_batch(self, items: list[tuple[Image.Image, str, int | None]], max_new_tokens: int,
                           stop: str | None = None) -> list[list[int] | Exception]:
        """`generate_ids_cached` for several prompts (a runtime may batch those sharing a prefix); an
        item that fails gets its exception in its place, the others are unaffected."""
        outputs: list[list[int] | Exception] = []
        for image, chat, prefix in items:
            try:
                outputs.append(self.generate_ids_cached(image, chat, max_new_tokens, prefix, stop))
            except Exception as exc:  # one prompt's failure must not lose the others
                outputs.append(exc)
        return outputs

    def logprobs_ids_cached(self, image: Image.Image, chat: str, ids: list[int], prefix_chars: int | None) -> np.ndarray:
        return self.logprobs_ids(image, chat, ids)

    def logprobs_ids_batch(self, items: list[tuple[Image.Image, str, list[int], int | None]]) -> list[np.ndarray | Exception]:
        """`logprobs_ids_cached` for several (image, chat, ids, prefix_chars) items (a runtime may run
        those sharing a prefix as one padded batch); a failing item gets its exception in its place."""
        outputs: list[np.ndarray | Exception] = []
        for image, chat, ids, prefix in items:
            try:
                outputs.append(self.logprobs_ids_cached(image, chat, ids, prefix))
            except Exception as exc:  # one prompt's failure must not lose the others
                outputs.append(exc)
        return outputs

    def generate(self, image: Image.Image, chat: str, max_new_tokens: int) -> str:
        return self.decode(self.generate_ids(image, chat, max_new_tokens))

    def logprobs(self, image: Image.Image, chat: str, continuation: str) -> np.ndarray:
        ids = self.tokenize(continuation)
        if not ids:
            raise ValueError("continuation is empty")
        return self.logprobs_ids(image, chat, ids)

    def describe(self) -> dict[str, Any]:
        return {"runtime": self.name}


def shared_prefix_length(ids: list[int], head: list[int], image_token_id: int, image_tokens: int) -> int:
    """How many leading prompt tokens are the tokens of the shared chat head (its one image pad
    expanded to the image's tokens); 0 when the full prompt does not start with exactly them (BPE
    merged across the boundary) or when nothing would be left to run after them."""
    expanded: list[int] = []
    for token in head:
        expanded.extend([token] * image_tokens if token == image_token_id else [token])
    n = len(expanded)
    if n >= len(ids) - 1 or ids[:n] != expanded:
        return 0
    return n

