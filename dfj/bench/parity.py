"""Logit-level agreement between a judge and its reference, in the style of llama.cpp's KL statistics.

The reference is teacher-forced on its own output; at every output position it keeps its top-K
log-probabilities (the full 151k-entry rows would be gigabytes for a bench). The artifact is
teacher-forced on the same text, and at each position

    KL(reference ‖ artifact) = Σ_top-K p (log p − log q) + p_rest (log p_rest − log q_rest)

over the top-K tokens plus one bucket for the rest of the vocabulary. That is the exact KL of the two
distributions coarsened to K+1 outcomes: never more than the full KL, and equal to it up to the
reference's tail mass beyond K (negligible for a judge's peaked output distribution).
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

TOP_K = 128


@dataclass
class ReferenceRows:
    """What the reference keeps per output position: its top-K and the forced token's log-prob."""

    ids: np.ndarray  # (T, K) int32, by decreasing probability
    logprobs: np.ndarray  # (T, K) float32
    token_logprob: np.ndarray  # (T,) float32: log p of the token the reference actually wrote

    @classmethod
    def from_logprobs(cls, logprobs: np.ndarray, tokens: list[int], k: int = TOP_K) -> "ReferenceRows":
        k = min(k, logprobs.shape[1])
        top = np.argpartition(-logprobs, k - 1, axis=1)[:, :k]
        values = np.take_along_axis(logprobs, top, axis=1)
        order = np.argsort(-values, axis=1, kind="stable")
        ids = np.take_along_axis(top, order, axis=1).astype(np.int32)
        forced = logprobs[np.arange(len(tokens)), np.asarray(tokens)]
        return cls(ids, np.take_along_axis(values, order, axis=1).astype(np.float32), forced.astype(np.float32))

    def save(self, path: Path) -> None:
        tmp = path.with_suffix(".tmp.npz")
        np.savez(tmp, ids=self.ids, logprobs=self.logprobs, token_logprob=self.token_logprob)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Path) -> "ReferenceRows":
        with np.load(path, allow_pickle=False) as data:
            return cls(data["ids"], data["logprobs"], data["token_logprob"])


@dataclass
class TokenParity:
    kl: list[float]  # per output position
    delta_p: list[float]  # p_artifact − p_reference of the reference's token
    top1: list[bool]  # same most likely token


def token_parity(reference: ReferenceRows, logprobs: np.ndarray, tokens: list[int]) -> TokenParity:
    """Compare an artifact's teacher-forced (T, vocab) log-probabilities with the reference's rows."""
    if logprobs.shape[0] != reference.ids.shape[0]:
        raise ValueError(
            f"the artifact tokenized the reference output into {logprobs.shape[0]} tokens, the reference into "
            f"{reference.ids.shape[0]}: tokenizers differ"
        )
    log_p = reference.logprobs.astype(np.float64)
    log_q = np.take_along_axis(logprobs, reference.ids.astype(np.int64), axis=1).astype(np.float64)
    p = np.exp(log_p)
    q = np.exp(log_q)
    kl = (p * (log_p - log_q)).sum(axis=1)
    p_rest = np.clip(1.0 - p.sum(axis=1), 0.0, 1.0)
    q_rest = np.clip(1.0 - q.sum(axis=1), 1e-30, 1.0)
    has_rest = p_rest > 1e-12
    kl[has_rest] += p_rest[has_rest] * (np.log(p_rest[has_rest]) - np.log(q_rest[has_rest]))
    rows = np.arange(len(tokens))
    delta_p = np.exp(logprobs[rows, np.asarray(tokens)].astype(np.float64)) - np.exp(reference.token_logprob.astype(np.float64))
    top1 = logprobs.argmax(axis=1) == reference.ids[:, 0]
    return TokenParity(np.maximum(kl, 0.0).tolist(), delta_p.tolist(), top1.tolist())


@dataclass
class ParitySummary:
    tokens: int
    kld_mean: float | None
    kld_p99: float | None
    kld_max: float | None
    rms_delta_p: float | None
    top1_agreement: float | None

    def to_dict(self) -> dict:
        return asdict(self)


def summarize(parts: list[TokenParity]) -> ParitySummary:
    kl = np.asarray([x for part in parts for x in part.kl], dtype=np.float64)
    if kl.size == 0:
        return ParitySummary(0, None, None, None, None, None)
    dp = np.asarray([x for part in parts for x in part.delta_p], dtype=np.float64)
    top1 = np.asarray([x for part in parts for x in part.top1], dtype=bool)
    return ParitySummary(
        tokens=int(kl.size),
        kld_mean=float(kl.mean()),
        kld_p99=float(np.percentile(kl, 99)),
        kld_max=float(kl.max()),
        rms_delta_p=float(np.sqrt((dp**2).mean())),
        top1_agreement=float(top1.mean()),
    )


# -- vision tower ---------------------------------------------------------------------------------------
def vision_parity(reference: np.ndarray, embeddings: np.ndarray) -> dict[str, float | int]:
    """One image's embeddings (image tokens, hidden) as an artifact feeds them to its language model,
    against the reference's: the cosine of each token's row (min, mean) and the relative L2 error."""
    if embeddings.shape != reference.shape:
        raise ValueError(f"image embeddings of shape {tuple(embeddings.shape)}, the reference's {tuple(reference.shape)}: "
                         "the runtimes split the image differently")
    ref = reference.astype(np.float64)
    got = np.asarray(embeddings, dtype=np.float64)
    norms = np.linalg.norm(ref, axis=1) * np.linalg.norm(got, axis=1)
    cosines = (ref * got).sum(axis=1) / np.maximum(norms, 1e-30)
    return {"tokens": int(ref.shape[0]), "cos_min": float(cosines.min()), "cos_sum": float(cosines.sum()),
            "rel_l2": float(np.linalg.norm(got - ref) / max(np.linalg.norm(ref), 1e-30))}


def summarize_vision(rows: list[dict]) -> dict:
    """Over the images: the lowest token cosine, the mean token cosine, the relative L2 (max, mean)."""
    good = [row for row in rows if not row.get("error")]
    errors = [row["error"] for row in rows if row.get("error")]
    if not good:
        return {"images": 0, "cos_min": None, "cos_mean": None, "rel_l2_max": None, "rel_l2_mean": None,
                "errors": errors[:5]}
    return {"images": len(good), "cos_min": min(row["cos_min"] for row in good),
            "cos_mean": sum(row["cos_sum"] for row in good) / sum(row["tokens"] for row in good),
            "rel_l2_max": max(row["rel_l2"] for row in good),
            "rel_l2_mean": float(np.mean([row["rel_l2"] for row in good])), "errors": errors[:5]}
