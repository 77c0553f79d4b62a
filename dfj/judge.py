"""The Judge: one contract over every runtime.

Prompt rendering, the chat layout, image loading, parsing and record handling happen here, once; the
runtime only runs the model. Single calls raise ValueError on bad input; batch calls never raise for
a record and never drop one: a record that cannot be judged comes back with `error` set.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import numpy as np

from dfj import prompts
from dfj.data import PointwiseRecord, record_from_mapping
from dfj.images import PATCH_FACTOR, ImageInput, check_image, fit_to_grid, load_image, smart_resize
from dfj.manifest import Manifest
from dfj.parse import parse_pairwise, parse_pointwise
from dfj.runtime import Runtime
from dfj.verdicts import PairwiseVerdict, PointwiseVerdict, failure

Progress = Callable[[int, int], None]
ANSWER_BRANCHES = ("<answer>A</answer>", "<answer>B</answer>")


@dataclass
class Judge:
    runtime: Runtime
    mode: str
    source: str = ""
    manifest: Manifest | None = None
    max_new_tokens: int | None = None  # None: the reference limit for the mode (512 / 128)
    info: dict[str, Any] = field(default_factory=dict)
    # Fast paths by default (prefix/vision reuse, one-forward pairwise); False: plain greedy generation.
    fast: bool = True

    def __post_init__(self) -> None:
        prompts.check_mode(self.mode)

    @property
    def runtime_name(self) -> str:
        return self.runtime.name

    @property
    def new_token_limit(self) -> int:
        return self.max_new_tokens or prompts.MAX_NEW_TOKENS[self.mode]

    # -- single records ------------------------------------------------------------------------
    def score(self, image: ImageInput, label: str, response: str, *, fast: bool | None = None,
              expected_score: bool = False) -> PointwiseVerdict:
        """Greedy verdict. `fast=True`: the runtime may reuse the image encoding and the KV state of the
        prompt shared by records of the same image and label, and decoding stops at `</score>`.
        `expected_score=True` adds Σ p(s)·s at the score position (one teacher-forced pass)."""
        self._require("pointwise", "score")
        fast = self.fast if fast is None else fast
        pil, chat = self._prepare(image, label, (response,))
        if fast:
            prefix = self._prefix_chars(chat, label)
            ids = self.runtime.generate_ids_cached(pil, chat, self.new_token_limit, prefix, stop="</score>")
            verdict = parse_pointwise(self.runtime.decode(ids))
        else:
            verdict = parse_pointwise(self.runtime.generate(pil, chat, self.new_token_limit))
        if expected_score and verdict.ok:
            verdict.expected_score = self._expected_score(pil, chat, verdict.text, label if fast else None)
        return verdict

    def compare(self, image: ImageInput, label: str, response_a: str, response_b: str, *,
                fast: bool | None = None, swap_check: bool = False) -> PairwiseVerdict:
        """Greedy verdict, or with `fast=True` one forward pass: force `<answer>` and read P(A) vs P(B)
        (`p_a`). `swap_check=True` also judges B-vs-A and reports whether the orders agree."""
        self._require("pairwise", "compare")
        fast = self.fast if fast is None else fast
        verdict = self._compare_once(image, label, response_a, response_b, fast)
        if swap_check and verdict.ok:
            swapped = self._compare_once(image, label, response_b, response_a, fast)
            if swapped.ok:
                verdict.swapped_choice = "B" if swapped.choice == "A" else "A"
                verdict.swap_consistent = verdict.swapped_choice == verdict.choice
        return verdict

    def _compare_once(self, image, label, response_a, response_b, fast: bool) -> PairwiseVerdict:
        pil, chat = self._prepare(image, label, (response_a, response_b))
        if not fast:
            return parse_pairwise(self.runtime.generate(pil, chat, self.new_token_limit))
        forced, at, tokens = self._answer_plan()
        rows = self.runtime.logprobs_ids_cached(pil, chat, forced, self._prefix_chars(chat, label))
        return _pairwise_verdict(rows[at], tokens)

    def _answer_plan(self) -> tuple[list[int], int, list[int]]:
        plan = self._branch_plan("", list(ANSWER_BRANCHES))
        if plan is None:
            raise RuntimeError("this tokenizer does not split <answer>A / <answer>B at one token; use fast=False")
        return plan

    def _expected_score(self, pil, chat: str, text: str, label: str | None) -> float | None:
        head = text[: text.index("<score>") + len("<score>")]
        prefix = self._prefix_chars(chat, label) if label is not None else None
        probabilities = self._branch_probabilities(pil, chat, head, [str(s) for s in range(1, 6)], prefix)
        if probabilities is None:
            return None
        total = sum(probabilities)
        return float(sum(p * s for p, s in zip(probabilities, range(1, 6))) / total)

    def _branch_probabilities(self, pil, chat: str, head: str, branches: list[str],
                              prefix_chars: int | None = None) -> list[float] | None:
        """P of each branch's first own token after `head`, from one teacher-forced pass; None when
        the branches do not part at one token."""
        plan = self._branch_plan(head, branches)
        if plan is None:
            return None
        forced, at, tokens = plan
        if prefix_chars is None:
            rows = self.runtime.logprobs_ids(pil, chat, forced)
        else:
            rows = self.runtime.logprobs_ids_cached(pil, chat, forced, prefix_chars)
        return [float(np.exp(rows[at][token])) for token in tokens]

    def _branch_plan(self, head: str, branches: list[str]) -> tuple[list[int], int, list[int]] | None:
        """(ids to force, index of the row where the branches part, each branch's token there).

        The branches are tokenized with the head (BPE can merge across the join); their shared token
        prefix is forced and the next token must differ between branches, else None."""
        tokenized = [self.runtime.tokenize(head + branch) for branch in branches]
        shared = 0
        while all(len(ids) > shared for ids in tokenized) and len({ids[shared] for ids in tokenized}) == 1:
            shared += 1
        if any(len(ids) <= shared for ids in tokenized) or len({ids[shared] for ids in tokenized}) != len(branches):
            return None
        return tokenized[0][: shared + 1], shared, [ids[shared] for ids in tokenized]

    def prompt_ids(self, image: ImageInput, label: str, *responses: str) -> list[int]:
        """The token ids the runtime runs for this judge call (each image token as `<|image_pad|>`), for
        inspection: the responses are plain text in them, so the only control tokens are the chat
        template's, whatever a response holds."""
        pil, chat = self._prepare(image, label, responses)
        return self.runtime.prompt_ids(pil, chat)

    def logprobs(self, image: ImageInput, label: str, *responses: str, continuation: str) -> np.ndarray:
        """Teacher-forced log-probabilities (continuation tokens x vocabulary) of `continuation` after
        the judge prompt: the basis of logit-level parity (KL divergence) between runtimes."""
        if not isinstance(continuation, str) or not continuation:
            raise ValueError("continuation must be a non-empty string")
        pil, chat = self._prepare(image, label, responses)
        return self.runtime.logprobs(pil, chat, continuation)

    def judge(self, record: Any) -> PointwiseVerdict | PairwiseVerdict:
        """Judge one record (a dfj record or a mapping) according to the judge's mode."""
        rec = record_from_mapping(record, self.mode)
        if isinstance(rec, PointwiseRecord):
            return self.score(rec.image, rec.label, rec.response)
        return self.compare(rec.image, rec.label, rec.response_a, rec.response_b)

    # -- batches -------------------------------------------------------------------------------
    def score_many(self, records: Iterable[Any], progress: Progress | None = None) -> list[PointwiseVerdict]:
        self._require("pointwise", "score_many")
        return self._many(records, progress)  # type: ignore[return-value]

    def compare_many(self, records: Iterable[Any], progress: Progress | None = None) -> list[PairwiseVerdict]:
        self._require("pairwise", "compare_many")
        return self._many(records, progress)  # type: ignore[return-value]

    def judge_many(self, records: Iterable[Any], progress: Progress | None = None) -> list[PointwiseVerdict | PairwiseVerdict]:
        return self._many(records, progress)

    def _many(self, records: Iterable[Any], progress: Progress | None) -> list[PointwiseVerdict | PairwiseVerdict]:
        items = list(records)
        if self.fast:
            return self._batched(items, progress)
        verdicts = []
        for index, record in enumerate(items):
            try:
                verdicts.append(self.judge(record))
            except Exception as exc:  # a runtime failure on one record must not lose the others
                verdicts.append(self._failed(index, record, _error_text(exc)))
            if progress:
                progress(index + 1, len(items))
        return verdicts

    def _batched(self, items: list[Any], progress: Progress | None, size: int = 10) -> list[PointwiseVerdict | PairwiseVerdict]:
        """Consecutive records on the same image and label run together as one padded batch (the DFJ
        layout: 5 responses or 10 pairs per image); a record that fails to prepare or to run gets its
        own error, the others are unaffected. Groups run as soon as they are complete, so only one
        group's images are held at a time."""
        verdicts: list[PointwiseVerdict | PairwiseVerdict | None] = [None] * len(items)
        group: list[tuple[int, Any, str, int]] = []
        group_key = None

        def run_group() -> None:
            try:
                if self.mode == "pointwise":
                    outputs = self.runtime.generate_ids_batch([(pil, chat, prefix) for _, pil, chat, prefix in group],
                                                              self.new_token_limit, stop="</score>")
                else:
                    forced, at, tokens = self._answer_plan()
                    outputs = self.runtime.logprobs_ids_batch([(pil, chat, forced, prefix) for _, pil, chat, prefix in group])
            except Exception as exc:  # the group could not run at all: every record in it says why
                outputs = [exc] * len(group)
            for (index, *_), output in zip(group, outputs):
                try:
                    if isinstance(output, Exception):
                        raise output
                    verdicts[index] = (parse_pointwise(self.runtime.decode(output)) if self.mode == "pointwise"
                                       else _pairwise_verdict(output[at], tokens))
                except Exception as exc:  # one record's failure must not lose the others
                    verdicts[index] = self._failed(index, items[index], _error_text(exc))
            group.clear()

        for index, record in enumerate(items):
            try:
                rec = record_from_mapping(record, self.mode)
                pil, chat = self._prepare(rec.image, rec.label, rec.responses())
            except Exception as exc:
                verdicts[index] = self._failed(index, record, _error_text(exc))
            else:
                key = (rec.image if isinstance(rec.image, str) else id(rec.image), rec.label.strip().lower())
                if group and (key != group_key or len(group) >= size):
                    run_group()
                group_key = key
                group.append((index, pil, chat, self._prefix_chars(chat, rec.label)))
            if progress:
                progress(index + 1 - len(group), len(items))
        if group:
            run_group()
        if progress:
            progress(len(items), len(items))
        return verdicts  # type: ignore[return-value]

    def _failed(self, index: int, record: Any, message: str) -> PointwiseVerdict | PairwiseVerdict:
        line = getattr(record, "line", None)
        where = f"record {index}" + (f" (line {line})" if line else "")
        return failure(self.mode, f"{where}: {message}")

    # -- shared preparation --------------------------------------------------------------------
    def _prepare(self, image: ImageInput, label: str, responses: tuple[str, ...]):
        prompt = prompts.render(self.mode, label, *responses)
        for name, response in zip(_response_names(self.mode), responses):
            _check_judgeable(name, response)
        # Resized once here, for every runtime alike (see dfj.images).
        pil = fit_to_grid(check_image(load_image(image), self.runtime.limits), self.runtime.limits)
        chat = prompts.render_chat(prompt)
        self._check_context(pil, chat)
        return pil, chat

    def _prefix_chars(self, chat: str, label: str) -> int:
        """Length of the chat text every record of this image and label shares (up to the first
        response): what a runtime may serve from its prefix cache."""
        head = prompts.prompt_head(self.mode, label)
        start = chat.find(head)
        return start + len(head) if start >= 0 else 0

    def _check_context(self, image, chat: str) -> None:
        """A prompt that does not fit the model's context is an error, never silently truncated."""
        context = getattr(self.runtime, "context_length", None)
        if not context:
            return
        height, width = smart_resize(image.height, image.width, self.runtime.limits)
        image_tokens = (height // PATCH_FACTOR) * (width // PATCH_FACTOR)
        # The chat holds one <|image_pad|> that the processor expands to the image's tokens.
        needed = len(self.runtime.tokenize_chat(chat)) - 1 + image_tokens + self.new_token_limit
        if needed > context:
            raise ValueError(
                f"prompt is too long: {needed - self.new_token_limit} tokens (image {image_tokens}) plus "
                f"{self.new_token_limit} new tokens exceed the judge's context of {context} tokens"
            )

    def _require(self, mode: str, method: str) -> None:
        if self.mode != mode:
            other = "compare" if mode == "pointwise" else "score"
            raise ValueError(f"{method}() needs a {mode} judge; this is a {self.mode} judge (use {other}())")

    def describe(self) -> dict[str, Any]:
        return {"source": self.source, "mode": self.mode, **self.runtime.describe(), **self.info}


def _pairwise_verdict(row: np.ndarray, tokens: list[int]) -> PairwiseVerdict:
    """The one-forward verdict from the log-probabilities at the answer letter: P(A) renormalised over A and B."""
    p_a, p_b = float(np.exp(row[tokens[0]])), float(np.exp(row[tokens[1]]))
    share = p_a / (p_a + p_b)
    choice = "A" if share >= 0.5 else "B"
    return PairwiseVerdict(choice=choice, text=f"<answer>{choice}</answer>", p_a=share)


def _error_text(exc: BaseException) -> str:
    """Bad input says what is wrong; anything else also says what kind of failure it was."""
    return str(exc) if isinstance(exc, (ValueError, OSError)) else f"{type(exc).__name__}: {exc}"


def _response_names(mode: str) -> tuple[str, ...]:
    return ("response",) if mode == "pointwise" else ("response_a", "response_b")


def _check_judgeable(name: str, response: str) -> None:
    """Text a judge can meaningfully rate: not blank, no NUL (a sign of binary or corrupt input)."""
    if not response.strip():
        raise ValueError(f"{name} is empty" + (" (whitespace only)" if response else ""))
    if "\x00" in response:
        raise ValueError(f"{name} contains a NUL character (binary or corrupt text)")


def load_judge(
    source: str,
    runtime: str | None = None,
    device: str = "cpu",
    dtype: str | None = None,
    mode: str | None = None,
    *,
    max_new_tokens: int | None = None,
    verify: bool = True,
    fast: bool = True,
    **options: Any,
) -> Judge:
    """Load a judge from a local folder (merged model, adapter, dfj artifact) or a Hugging Face id.

    `runtime=None` picks the runtime the artifact's format needs (`onnx` for an ONNX export, else `torch`).
    `fast=False` makes every call take the reference path (plain greedy generation, no caches).
    `verify=False` skips the checksum pass over the artifact files (it reads every byte).
    """
    from dfj import runtime as runtimes
    from dfj.sources import resolve

    resolved = resolve(source, mode=mode, verify_files=verify)
    recorded = (resolved.manifest.prompt_templates if resolved.manifest else {}).get(resolved.mode)
    if recorded and recorded != prompts.template_sha256(resolved.mode):
        warnings.warn(
            f"{source} was exported with a different {resolved.mode} prompt template than this dfj ships; "
            "its verdicts may differ from the ones it was checked with",
            stacklevel=2,
        )
    if runtime is None:  # what the artifact's format needs: torch for model folders, onnx for ONNX, …
        runtime = runtimes.runtime_for(resolved.manifest)
    backend = runtimes.create(runtime, resolved, device=device, dtype=dtype, **options)
    return Judge(runtime=backend, mode=resolved.mode, source=resolved.name, manifest=resolved.manifest,
                 max_new_tokens=max_new_tokens, info={"kind": resolved.kind}, fast=fast)
