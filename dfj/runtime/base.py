"""The runtime interface every backend implements."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import numpy as np
from PIL import Image

from dfj.images import PixelLimits


class Runtime(ABC):
    """Runs one judge model. Inputs are already validated: an RGB image and the full chat text."""

    name: str = ""
    limits: PixelLimits

    @classmethod
    @abstractmethod
    def load(cls, source: Any, device: str, dtype: str | None, **options: Any) -> "Runtime":
        """Build the runtime from a resolved `dfj.sources.Source`."""

    @abstractmethod
    def generate(self, image: Image.Image, chat: str, max_new_tokens: int) -> str:
        """Greedy continuation of `chat` (special tokens removed)."""

    @abstractmethod
    def logprobs(self, image: Image.Image, chat: str, continuation: str) -> np.ndarray:
        """(len(continuation tokens), vocab) float32 log-probabilities, teacher-forced."""

    @abstractmethod
    def tokenize(self, text: str) -> list[int]:
        """Token ids of plain text (special-token strings recognised), no image expansion."""

    def describe(self) -> dict[str, Any]:
        return {"runtime": self.name}
