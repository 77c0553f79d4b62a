"""The Judge: one contract over every runtime.

Prompt rendering, the chat layout, image loading, parsing and record handling happen here, once; the
runtime only runs the model. Single calls raise ValueError on bad input; batch calls never raise for
a record and never drop one: a record that cannot be judged comes back with `error` set.
"""

from __future__ import annotations

import functools
import os
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Literal

import numpy as np

from dfj import prompts
from dfj.data import PointwiseRecord, record_from_mapping
from dfj.groups import chunk_groups, group_key
from dfj.images import PATCH_FACTOR, ImageInput, check_image, fit_to_grid, read_image, smart_resize
from dfj.provenance import text_sha256
from dfj.manifest import Manifest
from dfj.parse import parse_pairwise, parse_pointwise
from dfj.runtime import Runtime
from dfj.runtime.base import IMAGE_PAD, Cancel, Prompt, Scoring, check_cancel
from dfj.verdicts import PairwiseVerdict, PointwiseVerdict, failure

Progress = Callable[[int, int], None]
PairwiseMethod = Literal["answer", "generate"]
PAIRWISE_METHODS: tuple[str, ...] = ("answer", "generate")
ANSWER_BRANCHES = ("<answer>A</answer>", "<answer>B</answer>")
# A one-forward pairwise verdict needs A and B to hold at least this much of the probability after the
# forced `<answer>`; below it the judge is not answering, and the verdict is malformed (a parse failure).
MIN_ANSWER_MASS = 0.5


@dataclass(frozen=True)
class BranchPlan:
    """Where a forced text parts into branches: the token ids to force (the branches' shared prefix and
    the first token that differs, as the first branch has it), the row of that parting token in the
    forced ids, and each branch's token at that row. A one-forward verdict reads the log-probabilities
    of `tokens` at row `at`."""

    forced: tuple[int, ...]
    at: int
    tokens: tuple[int, ...]


@dataclass
class Prepared:
    """One record ready for the runtime: its prompt (and, for a swap check, the prompt with A and B
    swapped). Records with equal `group` (same image and label) may run as one group: one runtime call
    that encodes the image and the shared prompt head once."""

    prompt: Prompt
    swapped: Prompt | None = None
    group: tuple[str, str] = ("", "")
    # The record's part of its verdict's provenance: the image's digest as read, each response's sha256.
    provenance: dict[str, Any] = field(default_factory=dict)


@dataclass
class Judge:
    runtime: Runtime
    mode: str
    source: str = ""
    manifest: Manifest | None = None
    max_new_tokens: int | None = None  # None: the reference limit for the mode (512 / 128)
    info: dict[str, Any] = field(default_factory=dict)
    # Pairwise verdicts: "answer" forces `<answer>` and reads P(A) vs P(B) in one forward pass (adds
    # `p_a`); "generate" writes the greedy text, as the DFJ reference scripts do.
    pairwise: PairwiseMethod = "answer"
    # What pins the judge's files (`dfj.provenance.artifact_identity`; load_judge sets it). None: a
    # judge built by hand, whose verdicts name no artifact.
    identity: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        prompts.check_mode(self.mode)
        if self.pairwise not in PAIRWISE_METHODS:
            raise ValueError(f"pairwise must be one of {', '.join(PAIRWISE_METHODS)}, not {self.pairwise!r}")
        self._image_pad = self.runtime.tokenize(IMAGE_PAD, True)

    @property
    def runtime_name(self) -> str:
        return self.runtime.name

    @functools.cached_property
    def run(self) -> dict[str, Any]:
        """The part of every verdict's provenance this loaded judge shares (`dfj.provenance`)."""
        from dfj.provenance import run_provenance

        return run_provenance(self, self.identity or {})

    @functools.cached_property
    def run_id(self) -> str:
        from dfj.provenance import run_id

        return run_id(self.run)

    @property
    def new_token_limit(self) -> int:
        return self.max_new_tokens or prompts.MAX_NEW_TOKENS[self.mode]

    # -- single records: the batch path with one record; bad input raises ValueError ------------------
    def score(self, image: ImageInput, label: str, response: str, *, expected_score: bool = False) -> PointwiseVerdict:
        """Greedy verdict (decoding stops at `</score>`). `expected_score=True` adds Σ p(s)·s at the score
        position (one teacher-forced pass)."""
        self._require("pointwise", "score")
        prepared = self._prepare(image, label, (response,))
        return _raised(self._pointwise([prepared], expected_score)[0])

    def compare(self, image: ImageInput, label: str, response_a: str, response_b: str, *,
                swap_check: bool = False) -> PairwiseVerdict:
        """The verdict by the judge's pairwise method. `swap_check=True` also judges B-vs-A and reports
        whether the two orders agree."""
        self._require("pairwise", "compare")
        prepared = self._prepare(image, label, (response_a, response_b), swap_check)
        return _raised(self._pairwise([prepared])[0])

    def judge(self, record: Any, *, expected_score: bool = False, swap_check: bool = False) -> PointwiseVerdict | PairwiseVerdict:
        """Judge one record (a dfj record or a mapping) according to the judge's mode."""
        rec = record_from_mapping(record, self.mode)
        if isinstance(rec, PointwiseRecord):
            return self.score(rec.image, rec.label, rec.response, expected_score=expected_score)
        return self.compare(rec.image, rec.label, rec.response_a, rec.response_b, swap_check=swap_check)

    def prompt(self, image: ImageInput, label: str, *responses: str) -> Prompt:
        """The prompt a judge call hands its runtime (token ids with one image pad, and the image fitted
        to the judge's grid): for calling the runtime directly (`embed_images`, `score`)."""
        return self._prepare(image, label, responses).prompt

    def prompt_ids(self, image: ImageInput, label: str, *responses: str) -> list[int]:
        """The token ids the runtime runs for this judge call, each image token as `<|image_pad|>`, for
        inspection: the responses are plain text in them, so the only control tokens are the chat
        template's, whatever a response holds."""
        prompt = self._prepare(image, label, responses).prompt
        pad = self._image_pad[0]
        at = prompt.ids.index(pad)
        return list(prompt.ids[:at]) + [pad] * self._image_tokens(prompt.image) + list(prompt.ids[at + 1:])

    def logprobs(self, image: ImageInput, label: str, *responses: str, continuation: str) -> np.ndarray:
        """Teacher-forced log-probabilities (continuation tokens x vocabulary) of `continuation` after
        the judge prompt: the basis of logit-level parity (KL divergence) between runtimes."""
        if not isinstance(continuation, str) or not continuation:
            raise ValueError("continuation must be a non-empty string")
        prompt = self._prepare(image, label, responses).prompt
        forced = tuple(self.runtime.tokenize(continuation, True))
        return _raised(self.runtime.score([prompt], [Scoring(forced, full=True)])[0]).rows

    # -- batches: consecutive records of one image and label are one runtime call ---------------------
    def score_many(self, records: Iterable[Any], progress: Progress | None = None, *,
                   expected_score: bool = False) -> list[PointwiseVerdict]:
        self._require("pointwise", "score_many")
        return self._many(records, progress, expected_score=expected_score)  # type: ignore[return-value]

    def compare_many(self, records: Iterable[Any], progress: Progress | None = None, *,
                     swap_check: bool = False) -> list[PairwiseVerdict]:
        self._require("pairwise", "compare_many")
        return self._many(records, progress, swap_check=swap_check)  # type: ignore[return-value]

    def judge_many(self, records: Iterable[Any], progress: Progress | None = None, *, expected_score: bool = False,
                   swap_check: bool = False) -> list[PointwiseVerdict | PairwiseVerdict]:
        return self._many(records, progress, expected_score=expected_score, swap_check=swap_check)

    def _many(self, records: Iterable[Any], progress: Progress | None, expected_score: bool = False,
              swap_check: bool = False) -> list[PointwiseVerdict | PairwiseVerdict]:
        """Consecutive records on the same image and label run as one group (`dfj.groups`: one runtime
        call); a record that fails to prepare or to run gets its own error, the others are unaffected.
        Groups run as soon as they are complete, so only one group's images are held at a time."""
        items = list(records)
        verdicts: list[PointwiseVerdict | PairwiseVerdict | None] = [None] * len(items)
        settled = 0  # records with a verdict, for `progress`

        def prepared() -> Iterator[tuple[int, Prepared]]:
            nonlocal settled
            for index, record in enumerate(items):
                try:
                    yield index, self.prepare(record, swap_check=swap_check)
                except Exception as exc:
                    verdicts[index] = self._failed(index, record, error_text(exc))
                    settled += 1

        for group in chunk_groups(prepared(), key=lambda entry: entry[1].group):
            results = self.run_group([p for _, p in group], expected_score=expected_score)
            for (index, _), result in zip(group, results):
                verdicts[index] = (self._failed(index, items[index], error_text(result))
                                   if isinstance(result, Exception) else result)
            settled += len(group)
            if progress:
                progress(settled, len(items))
        if progress:
            progress(len(items), len(items))
        return verdicts  # type: ignore[return-value]

    # -- the batch-first path in two steps (dfj.serve queues prepared records from many requests) -------
    def prepare(self, record: Any, *, swap_check: bool = False) -> Prepared:
        """A record (dfj record or mapping; its image a path, bytes or PIL image) as token ids and a
        fitted image, checked: a ValueError names what is wrong with it."""
        rec = record_from_mapping(record, self.mode)
        prepared = self._prepare(rec.image, rec.label, rec.responses(), swap_check)
        prepared.group = group_key(rec.image if isinstance(rec.image, str) else prepared.prompt.image_key, rec.label)
        return prepared

    def run_group(self, group: list[Prepared], *, expected_score: bool = False,
                  cancel: Cancel | None = None) -> list[PointwiseVerdict | PairwiseVerdict | Exception]:
        """Verdicts of prepared records in one runtime call (records of one `group` key share its image
        encoding and prompt head; others are correct too, only slower); an exception in the place of a
        record that could not run. `cancel` is polled while generating: once true, the records not yet
        finished get `Cancelled`. Never raises for the records' sake."""
        try:
            check_cancel(cancel)
            return (self._pointwise(group, expected_score, cancel) if self.mode == "pointwise"
                    else self._pairwise(group, cancel))
        except Exception as exc:  # the group could not run at all: every record in it says why
            return [exc] * len(group)

    # -- one group, one runtime call -----------------------------------------------------------------
    def _pointwise(self, group: list[Prepared], expected_score: bool, cancel: Cancel | None = None) -> list[Any]:
        outputs = self.runtime.generate([p.prompt for p in group], self.new_token_limit, stop="</score>", cancel=cancel)
        verdicts = [out if isinstance(out, Exception) else parse_pointwise(self.runtime.decode(out)) for out in outputs]
        if expected_score:
            self._add_expected_scores(group, verdicts)
        return self._stamped(group, verdicts, {"expected_score": expected_score})

    def _add_expected_scores(self, group: list[Prepared], verdicts: list[Any]) -> None:
        todo = []
        for prepared, verdict in zip(group, verdicts):
            if isinstance(verdict, PointwiseVerdict) and verdict.ok:
                head = verdict.text[: verdict.text.index("<score>") + len("<score>")]
                plan = self._branch_plan(head, [str(s) for s in range(1, 6)])
                if plan is not None:
                    todo.append((verdict, prepared.prompt, plan))
        if not todo:
            return
        scores = self.runtime.score([prompt for _, prompt, _ in todo],
                                    [Scoring(plan.forced, tokens=plan.tokens) for _, _, plan in todo])
        for (verdict, _, plan), result in zip(todo, scores):
            if isinstance(result, Exception):
                verdict.error = f"expected score: {error_text(result)}"
                continue
            probabilities = np.exp(result.tokens[plan.at].astype(np.float64))
            verdict.expected_score = float((probabilities * np.arange(1, 6)).sum() / probabilities.sum())

    def _pairwise(self, group: list[Prepared], cancel: Cancel | None = None) -> list[Any]:
        prompts_ = [p.prompt for p in group] + [p.swapped for p in group if p.swapped is not None]
        if self.pairwise == "answer":
            plan = self.answer_plan()
            results = self.runtime.score(prompts_, [Scoring(plan.forced, tokens=plan.tokens)] * len(prompts_))
            verdicts = [r if isinstance(r, Exception) else _pairwise_verdict(r.tokens[plan.at]) for r in results]
        else:
            outputs = self.runtime.generate(prompts_, self.new_token_limit, stop="</answer>", cancel=cancel)
            verdicts = [o if isinstance(o, Exception) else parse_pairwise(self.runtime.decode(o)) for o in outputs]
        swapped = iter(verdicts[len(group):])
        for prepared, verdict in zip(group, verdicts):
            if prepared.swapped is None:
                continue
            other = next(swapped)
            if isinstance(verdict, PairwiseVerdict) and verdict.ok and isinstance(other, PairwiseVerdict) and other.ok:
                verdict.swapped_choice = "B" if other.choice == "A" else "A"
                verdict.swap_consistent = verdict.swapped_choice == verdict.choice
        return [self._stamped([prepared], [verdict], {"swap_check": prepared.swapped is not None})[0]
                for prepared, verdict in zip(group, verdicts)]

    def _stamped(self, group: list[Prepared], verdicts: list[Any], options: dict[str, bool]) -> list[Any]:
        """Each verdict with its provenance: this judge's run and the record's part."""
        for prepared, verdict in zip(group, verdicts):
            if not isinstance(verdict, Exception):
                verdict.provenance = {"run_id": self.run_id, "run": self.run, **prepared.provenance, "options": options}
        return verdicts

    def answer_plan(self) -> BranchPlan:
        """How this judge's one-forward pairwise verdict reads P(A): `<answer>A</answer>` and
        `<answer>B</answer>` tokenized by its own tokenizer (in Qwen2.5's, `<`, `answer`, then `>A` or
        `>B`). A host driving another program on the same artifact (llama-server, ORT GenAI) ends its
        prompt with `forced[:at]` and reads the probabilities of `tokens`."""
        plan = self._branch_plan("", list(ANSWER_BRANCHES))
        if plan is None:
            raise RuntimeError("this tokenizer does not split <answer>A / <answer>B at one token; use pairwise='generate'")
        return plan

    def _branch_plan(self, head: str, branches: list[str]) -> BranchPlan | None:
        """The branches are tokenized with the head (BPE can merge across the join); their shared token
        prefix is forced and the next token must differ between branches, else None."""
        tokenized = [self.runtime.tokenize(head + branch, True) for branch in branches]
        shared = 0
        while all(len(ids) > shared for ids in tokenized) and len({ids[shared] for ids in tokenized}) == 1:
            shared += 1
        if any(len(ids) <= shared for ids in tokenized) or len({ids[shared] for ids in tokenized}) != len(branches):
            return None
        return BranchPlan(tuple(tokenized[0][: shared + 1]), shared, tuple(ids[shared] for ids in tokenized))

    def _failed(self, index: int, record: Any, message: str) -> PointwiseVerdict | PairwiseVerdict:
        line = getattr(record, "line", None)
        return failure(self.mode, f"line {line}: {message}" if line else f"record {index}: {message}")

    # -- shared preparation --------------------------------------------------------------------
    def _prepare(self, image: ImageInput, label: str, responses: tuple[str, ...], swap_check: bool = False) -> Prepared:
        """The record as token ids: the chat template's text with its control tokens, the prompt (label
        and responses) as plain text; its head is the chat up to the first response."""
        prompt = prompts.render(self.mode, label, *responses)
        for name, response in zip(_response_names(self.mode), responses):
            _check_judgeable(name, response)
        # Resized once here, for every runtime alike (see dfj.images); the bytes as read are hashed.
        loaded, image_sha256 = read_image(image)
        pil = fit_to_grid(check_image(loaded, self.runtime.limits), self.runtime.limits)
        first = self._prompt(pil, prompt, label)
        self._check_context(first)
        swapped = None
        if swap_check and self.mode == "pairwise":
            swapped = self._prompt(pil, prompts.render(self.mode, label, responses[1], responses[0]), label)
        return Prepared(first, swapped, provenance={"image_sha256": image_sha256,
                                                    "responses_sha256": [text_sha256(r) for r in responses]})

    def _prompt(self, pil, prompt: str, label: str) -> Prompt:
        tokenize = self.runtime.tokenize
        head_text, user, rest = prompts.split_chat(prompts.render_chat(prompt))
        head, body = tokenize(head_text, True), tokenize(user, False)
        # The tokens of the prompt's shared part (up to the first response) that the whole prompt starts
        # with: BPE may merge across the join, so only the common leading tokens count.
        shared = tokenize(prompts.prompt_head(self.mode, label), False)
        common = 0
        while common < min(len(shared), len(body)) and shared[common] == body[common]:
            common += 1
        return Prompt(pil, tuple(head + body + tokenize(rest, True)), len(head) + common)

    def _image_tokens(self, image) -> int:
        height, width = smart_resize(image.height, image.width, self.runtime.limits)
        return (height // PATCH_FACTOR) * (width // PATCH_FACTOR)

    def _check_context(self, prompt: Prompt) -> None:
        """A prompt that does not fit the model's context is an error, never silently truncated."""
        context = getattr(self.runtime, "context_length", None)
        if not context:
            return
        image_tokens = self._image_tokens(prompt.image)
        # The prompt holds one <|image_pad|> that the runtime expands to the image's tokens.
        needed = len(prompt.ids) - 1 + image_tokens + self.new_token_limit
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
        return {"source": self.source, "mode": self.mode, "pairwise": self.pairwise, **self.runtime.describe(), **self.info}


def _raised(result: Any) -> Any:
    """A single call's result, or the exception the runtime gave for it raised."""
    if isinstance(result, Exception):
        raise result
    return result


def _pairwise_verdict(answer: np.ndarray) -> PairwiseVerdict:
    """The one-forward verdict from the log-probabilities of A and B at the answer letter: P(A)
    renormalised over A and B; malformed when A and B together hold too little of the probability."""
    p_a, p_b = float(np.exp(answer[0])), float(np.exp(answer[1]))
    share = p_a / (p_a + p_b) if p_a + p_b > 0 else 0.5
    if p_a + p_b < MIN_ANSWER_MASS:
        return PairwiseVerdict(choice=None, text="<answer>", p_a=share,
                               error=f"after <answer> the letters A and B hold {p_a + p_b:.1%} of the probability "
                                     f"(less than {MIN_ANSWER_MASS:.0%}): no verdict")
    choice = "A" if share >= 0.5 else "B"
    return PairwiseVerdict(choice=choice, text=f"<answer>{choice}</answer>", p_a=share)


def error_text(exc: BaseException) -> str:
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
    pairwise: PairwiseMethod = "answer",
    public_key: str | os.PathLike | None = None,
    **options: Any,
) -> Judge:
    """Load a judge from a local folder (merged model, adapter, dfj artifact) or a Hugging Face id.

    `runtime=None` picks the runtime the artifact's format needs (`onnx` for an ONNX export, else `torch`).
    `pairwise="answer"` (default) reads P(A) vs P(B) after a forced `<answer>` in one forward pass;
    `pairwise="generate"` writes the greedy text, as the DFJ reference scripts do.
    `verify=False` skips the checksum pass over the artifact files (it reads every byte).
    `public_key` (a PEM file): refuse the artifact unless its `dfj.json.sig` verifies with that key
    (`dfj.signing`); its files are then checked against the signed `dfj.json`.
    """
    from dfj import runtime as runtimes
    from dfj.manifest import ArtifactError
    from dfj.provenance import artifact_identity
    from dfj.sources import resolve

    if public_key is not None and not verify:
        raise ValueError("public_key vouches for dfj.json, which vouches for the files: it needs verify=True")
    resolved = resolve(source, mode=mode, verify_files=verify)
    if public_key is not None:
        from dfj.signing import verify_signature

        if resolved.manifest is None:
            raise ArtifactError(f"{source} is not a dfj artifact (no dfj.json): there is no signature to check")
        verify_signature(resolved.path, public_key)
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
                 max_new_tokens=max_new_tokens, info={"kind": resolved.kind}, pairwise=pairwise,
                 identity=artifact_identity(resolved))
