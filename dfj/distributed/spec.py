"""What a distributed run needs, typed and checked before any cluster is touched."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from dfj.judge import PAIRWISE_METHODS, PairwiseMethod


@dataclass(frozen=True)
class RaySpec:
    address: str | None = None  # None: start a local Ray instance; else join this cluster ("auto", "ray://…", "host:6379")
    actors: int = 1  # judges loaded at once, each one artifact load
    cpus_per_actor: float = 1.0
    gpus_per_actor: float = 0.0

    def __post_init__(self) -> None:
        if self.actors < 1:
            raise ValueError(f"--actors must be at least 1, not {self.actors}")
        if self.cpus_per_actor <= 0:
            raise ValueError(f"--cpus-per-actor must be over 0, not {self.cpus_per_actor:g}")
        if self.gpus_per_actor < 0:
            raise ValueError(f"--gpus-per-actor must be 0 or more, not {self.gpus_per_actor:g}")


@dataclass(frozen=True)
class JudgeLoad:
    """How every actor loads the judge: `dfj.load_judge`'s arguments."""

    artifact: str  # a path every worker sees (shared storage), the same files on each
    runtime: str | None = None
    device: str = "cpu"
    dtype: str | None = None
    mode: str | None = None
    max_new_tokens: int | None = None
    pairwise: PairwiseMethod = "answer"
    public_key: str | None = None  # every actor refuses the artifact unless its signature verifies with it

    def __post_init__(self) -> None:
        if self.pairwise not in PAIRWISE_METHODS:
            raise ValueError(f"pairwise must be one of {', '.join(PAIRWISE_METHODS)}, not {self.pairwise!r}")

    def check(self, spec: RaySpec) -> None:
        if self.device.startswith("cuda") and spec.gpus_per_actor <= 0:
            raise ValueError("--device cuda needs --gpus-per-actor (Ray gives an actor only the GPUs it asks for)")
        if spec.gpus_per_actor > 0 and not self.device.startswith("cuda"):
            raise ValueError("--gpus-per-actor is for --device cuda")

    def kwargs(self) -> dict[str, Any]:
        fields = asdict(self)
        fields.pop("artifact")
        return fields
