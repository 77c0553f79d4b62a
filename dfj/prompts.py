"""The DFJ prompt templates and the Qwen2.5-VL chat layout, shared by every runtime.

The templates contain literal braces (`{A_or_B}`, `{integer score from 1 to 5}`, ...), so they are
never passed to `str.format`: only the named placeholders are replaced, in one pass, so that
placeholder-like text inside a response is left exactly as written.
"""

from __future__ import annotations

import hashlib
import re
from functools import lru_cache
from importlib import resources
from typing import Sequence

MODES = ("pointwise", "pairwise")
LABELS = ("real", "fake", "edited")

POINTWISE_PLACEHOLDERS = ("ground_truth_label", "candidate_response")
PAIRWISE_PLACEHOLDERS = ("ground_truth_label", "response_a", "response_b")
PLACEHOLDERS = {"pointwise": POINTWISE_PLACEHOLDERS, "pairwise": PAIRWISE_PLACEHOLDERS}

# How every runtime tokenizes a judge call, recorded in each manifest. A deliberate deviation from
# the DFJ reference scripts, which tokenize the whole chat with special tokens recognised anywhere, so
# that a detector's response can close the user's turn and forge the judge's answer: dfj keeps the
# chat template's control tokens and tokenizes the user's prompt (label, responses) as plain text
# (`split_chat`). A response without special-token strings gets the reference's ids exactly.
PROMPT_TOKENIZATION = "template-control-tokens; prompt-as-plain-text"

# The reference decoding limits (DeepfakeJudge inference scripts).
MAX_NEW_TOKENS = {"pointwise": 512, "pairwise": 128}
# The Qwen2.5-VL chat template's system turn when a chat has none (the DFJ judges were trained so).
DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."


@lru_cache(maxsize=None)
def template(mode: str) -> str:
    """The raw DFJ prompt template for `mode`, as shipped (LF line endings, trailing spaces kept)."""
    check_mode(mode)
    return _read_reference(f"{mode}_prompt.txt")


@lru_cache(maxsize=None)
def chat_template() -> str:
    """The Qwen2.5-VL chat template (jinja), as shipped with the base model."""
    return _read_reference("qwen2_5_vl_chat_template.jinja")


def template_sha256(mode: str) -> str:
    return hashlib.sha256(template(mode).encode("utf-8")).hexdigest()


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"unknown judge mode {mode!r}: expected 'pointwise' or 'pairwise'")
    return mode


def normalize_label(label: object) -> str:
    """Return the ground-truth label in DFJ's spelling (`real`, `fake`, `edited`); else ValueError."""
    if not isinstance(label, str):
        raise ValueError(f"label must be a string, got {type(label).__name__}")
    value = label.strip().lower()
    if value not in LABELS:
        raise ValueError(f"unknown label {label!r}: expected one of real, fake, edited")
    return value


def check_response(response: object, name: str = "response") -> str:
    """A candidate response must be text; it is otherwise passed on exactly as given."""
    if not isinstance(response, str):
        raise ValueError(f"{name} must be a string, got {type(response).__name__}")
    return response


def fill(template_text: str, values: dict[str, str]) -> str:
    """Replace `{name}` for the given names only, in a single left-to-right pass."""
    pattern = re.compile("|".join(re.escape("{" + name + "}") for name in values))
    return pattern.sub(lambda m: values[m.group(0)[1:-1]], template_text)


def render_pointwise(label: str, response: str) -> str:
    """The filled pointwise prompt (the user turn's text)."""
    values = {
        "ground_truth_label": normalize_label(label),
        "candidate_response": check_response(response),
    }
    return fill(template("pointwise"), values)


def render_pairwise(label: str, response_a: str, response_b: str) -> str:
    """The filled pairwise prompt (the user turn's text)."""
    values = {
        "ground_truth_label": normalize_label(label),
        "response_a": check_response(response_a, "response_a"),
        "response_b": check_response(response_b, "response_b"),
    }
    return fill(template("pairwise"), values)


def render(mode: str, label: str, *responses: str) -> str:
    """Dispatch on mode: one response for pointwise, two for pairwise."""
    expected = 1 if check_mode(mode) == "pointwise" else 2
    if len(responses) != expected:
        raise ValueError(f"a {mode} judge takes {expected} response(s), got {len(responses)}")
    if mode == "pointwise":
        return render_pointwise(label, responses[0])
    return render_pairwise(label, responses[0], responses[1])


def prompt_head(mode: str, label: str) -> str:
    """The filled prompt up to the first response: the part every record of one label shares."""
    first = "{candidate_response}" if check_mode(mode) == "pointwise" else "{response_a}"
    return fill(template(mode).split(first, 1)[0], {"ground_truth_label": normalize_label(label)})


def render_chat(prompt: str, add_generation_prompt: bool = True) -> str:
    """The full chat text for one user turn holding [image, prompt], as the reference inference built it.

    Rendered with the Qwen2.5-VL chat template itself (default system prompt included), so every
    runtime sees the same string, and a test pins it to the processor's own rendering.
    """
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
    return _compiled_chat_template().render(
        messages=messages, add_generation_prompt=add_generation_prompt, add_vision_id=False
    )


def split_chat(chat: str) -> tuple[str, str, str]:
    """(head, prompt, rest) of a chat made by `render_chat`: the template's text up to and including the
    image block, the user's prompt, and the template's closing text (plus any continuation a caller
    appended after it, such as a teacher-forced judge output).

    Only head and rest are chat structure. The prompt holds the label and the detector's responses,
    which are untrusted: runtimes tokenize it as plain text, so `<|im_end|>` written in a response is
    seven ordinary tokens, never the end of the user's turn. (The DFJ reference scripts tokenize the
    whole chat with special tokens recognised, so a response can forge a turn there; dfj deviates.)
    Neither head nor rest can be forged by a prompt: head is a prefix, and rest starts at the *last*
    occurrence of the template's closing text.
    """
    head, closing = _chat_frame()
    end = chat.rfind(closing)
    if not chat.startswith(head) or end < len(head):
        raise ValueError("not a chat made by dfj.prompts.render_chat (one user turn: the image, then the prompt)")
    return head, chat[len(head):end], chat[end:]


@lru_cache(maxsize=None)
def _chat_frame() -> tuple[str, str]:
    """The chat template's text before and after the user's prompt."""
    marker = "\x00"  # never in a judged prompt: responses holding a NUL are refused
    head, closing = render_chat(marker).split(marker)
    return head, closing


def parse_prompt(mode: str, prompt: str) -> dict[str, str] | None:
    """Invert `render_*`: recover the placeholder values from a filled prompt, or None if it is not one."""
    match = _inverse_pattern(mode).fullmatch(prompt)
    return None if match is None else match.groupdict()


@lru_cache(maxsize=None)
def _inverse_pattern(mode: str) -> re.Pattern[str]:
    text = template(mode)
    names = PLACEHOLDERS[mode]
    splitter = re.compile("(" + "|".join(re.escape("{" + n + "}") for n in names) + ")")
    parts = []
    for piece in splitter.split(text):
        if piece.startswith("{") and piece[1:-1] in names:
            name = piece[1:-1]
            # The label is a single word; responses can hold anything, newlines included.
            parts.append(rf"(?P<{name}>\S+)" if name == "ground_truth_label" else rf"(?P<{name}>.*?)")
        else:
            parts.append(re.escape(piece))
    return re.compile("".join(parts), re.DOTALL)


@lru_cache(maxsize=None)
def _compiled_chat_template():
    import jinja2.sandbox

    env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    return env.from_string(chat_template())


def _read_reference(name: str) -> str:
    data = resources.files("dfj").joinpath("reference", name).read_bytes()
    return data.decode("utf-8")


def image_block(ids: Sequence[int], pad_id: int) -> int:
    """Index of the one image pad in a prompt's ids; an error unless there is exactly one."""
    at = [i for i, token in enumerate(ids) if token == pad_id]
    if len(at) != 1:
        raise ValueError(f"a prompt holds exactly one image pad, this one {len(at)}")
    return at[0]
