"""Parse a judge's generated text into a verdict.

Only the judge's own output is parsed, never the prompt: candidate responses carry `<answer>` tags
of their own. A text that is not exactly one well-formed verdict gives `error`, never a guess.
"""

from __future__ import annotations

import re

from dfj.verdicts import PairwiseVerdict, PointwiseVerdict

_SCORE = re.compile(r"<score>(.*?)</score>", re.DOTALL)
_REASONING = re.compile(r"<reasoning>(.*?)</reasoning>", re.DOTALL)
_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


def parse_pointwise(text: str) -> PointwiseVerdict:
    """`<reasoning>…</reasoning>\\n<score>N</score>` with N an integer from 1 to 5."""
    if not text or not text.strip():
        return PointwiseVerdict(None, None, text or "", "empty output")
    scores = _SCORE.findall(text)
    reasonings = _REASONING.findall(text)
    reasoning = reasonings[0].strip() if len(reasonings) == 1 else None
    if len(reasonings) > 1:
        return PointwiseVerdict(None, None, text, f"{len(reasonings)} <reasoning> blocks, expected one")
    if not scores:
        return PointwiseVerdict(None, reasoning, text, "no <score>…</score> in output")
    if len(scores) > 1:
        return PointwiseVerdict(None, reasoning, text, f"{len(scores)} <score> tags, expected one")
    raw = scores[0].strip()
    if not re.fullmatch(r"[0-9]+", raw):
        return PointwiseVerdict(None, reasoning, text, f"score {raw!r} is not an integer")
    score = int(raw)
    if not 1 <= score <= 5:
        return PointwiseVerdict(None, reasoning, text, f"score {score} is outside 1-5")
    return PointwiseVerdict(score, reasoning, text, None)


def parse_pairwise(text: str) -> PairwiseVerdict:
    """`<answer>A</answer>` or `<answer>B</answer>`, exactly once."""
    if not text or not text.strip():
        return PairwiseVerdict(None, text or "", "empty output")
    answers = _ANSWER.findall(text)
    if not answers:
        return PairwiseVerdict(None, text, "no <answer>…</answer> in output")
    if len(answers) > 1:
        return PairwiseVerdict(None, text, f"{len(answers)} <answer> tags, expected one")
    choice = answers[0].strip()
    if choice not in ("A", "B"):
        return PairwiseVerdict(None, text, f"answer {choice!r} is not A or B")
    return PairwiseVerdict(choice, text, None)  # type: ignore[arg-type]


def parse(mode: str, text: str) -> PointwiseVerdict | PairwiseVerdict:
    return parse_pointwise(text) if mode == "pointwise" else parse_pairwise(text)
