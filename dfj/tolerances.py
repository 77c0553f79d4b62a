"""Every parity bound dfj gates on, in one table: what an export or quantization refuses to write,
and what `dfj bench` gates by default. The stages and the bench read these values; nothing else
sets a bound.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal


@dataclass(frozen=True)
class ExportGates:
    """Probe logits of a written artifact against transformers on its source (`dfj.artifact.probe`)."""

    # A lossless path (the fp32 merge, fp32 ONNX) differs from its source only by fp32 rounding, which
    # grows with the logits: max |delta logit| <= atol + rtol * max |reference logit|, as numpy.allclose.
    # Measured: 1.1e-4 on a trained tiny judge's merge whose logits reach 19.8.
    lossless_atol: float = 1e-4
    lossless_rtol: float = 1e-5
    # A merge in any dtype (bf16 included): the direction of the probe's rows.
    merge_min_cosine: float = 0.999
    # The f32 GGUF against transformers fp32: llama.cpp's f32 arithmetic is not torch's (measured max
    # |delta logit| 6.4e-3 on the tiny judge, 1.8e-2 on a 3B-width judge with 4 layers; cosine >= 0.99999):
    # gated on the direction (a wrong or mis-split tensor drops it far below), loosely on size.
    gguf_f32_min_cosine: float = 0.9999
    gguf_f32_max_abs: float = 0.1
    # GPTQ against its fp32 input: a tensor quantized wrongly (or not calibrated) falls far below.
    gptq_min_cosine: float = 0.90


@dataclass(frozen=True)
class BenchGates:
    """`dfj bench --tolerance`: how much worse than the reference an artifact may be."""

    rmse: float = 0.05  # pointwise RMSE may rise by this much
    pearson: float = 0.02  # pointwise Pearson may drop by this much
    accuracy: float = 1.0  # pairwise accuracy may drop by this many percentage points
    parse: float = 0.02  # parse-failure rate may rise by this much (a share of records)
    kld: float = 0.05  # mean per-token KL(reference || artifact), nats
    # The image embeddings the artifact feeds its language model against the reference's: the mean
    # cosine of their rows (one per image token) may fall below 1 by this much. Measured on the trained
    # tiny judges (4 test images): every demo artifact within 1e-6 (bf16 vision weights 9.1e-7, an f16
    # mmproj 2.3e-8); one vision block's weights scaled by 1.01: 6.8e-6, by 1.05: 1.7e-4 to 5.8e-4.
    vision_cos: float = 5e-5


@dataclass(frozen=True)
class BenchGate:
    """How `dfj bench` applies one tolerance: to which measure of an artifact, in which direction that
    measure gets worse, and in what unit the tolerance is given.

    `delta`: the artifact's quality minus the reference's (`metric`) may move in the `worse` direction
    by at most the tolerance x `scale`; `bound`: the measure itself may be at most the tolerance."""

    key: str  # the `--tolerance` key, a field of BenchGates
    measure: Literal["delta", "bound"]
    metric: str  # the quality key (delta), or the artifact measure (bound)
    worse: Literal[1, -1]  # +1: a larger value is worse
    unit: str  # of the tolerance
    scale: float = 1.0  # tolerance -> the metric's own unit
    modes: tuple[str, ...] = ("pointwise", "pairwise")


BENCH_GATES: tuple[BenchGate, ...] = (
    BenchGate("parse", "delta", "parse_failure_rate", +1, "share of records"),
    BenchGate("rmse", "delta", "rmse", +1, "score", modes=("pointwise",)),
    BenchGate("pearson", "delta", "pearson", -1, "correlation", modes=("pointwise",)),
    BenchGate("accuracy", "delta", "accuracy", -1, "percentage points", scale=0.01, modes=("pairwise",)),
    BenchGate("kld", "bound", "kld_mean", +1, "nats per token"),
    BenchGate("vision_cos", "bound", "vision_cos_gap", +1, "1 - mean token cosine"),
)

EXPORT = ExportGates()
BENCH = BenchGates()
assert sorted(g.key for g in BENCH_GATES) == sorted(asdict(BENCH)), "a bench tolerance without its gate row"


def bench_defaults() -> dict[str, float]:
    """The bench gate's defaults, as `--tolerance` keys."""
    return asdict(BENCH)
