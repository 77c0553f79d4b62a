"""Request bodies -> records for the judge. Runs off the event loop (JSON and base64 of up to the
body cap). Every problem is a `BadInput` naming the field, answered 422; the record's content itself
(label, responses, image pixels) is checked later by `Judge.prepare`, with the library's messages.

Images come inline (base64, or a `data:` URL); the server fetches nothing (no server-side requests).
A file path (`image_path`) is read only when the service was started with an image root, and only
from inside it.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dfj import prompts
from dfj.data import RecordProblem, resolve_image


class BadInput(ValueError):
    """A request the service cannot take as it is (answered 422 with this message)."""


@dataclass
class Item:
    """One record to judge: the mapping `Judge.prepare` takes, and the key of requests that can share
    a runtime call (same image bytes or file, same label)."""

    record: dict[str, Any]
    group: tuple[str, str]


@dataclass
class Options:
    expected_score: bool = False
    swap_check: bool = False


POINTWISE_FIELDS = ("label", "response")
PAIRWISE_FIELDS = ("label", "response_a", "response_b")
IMAGE_FIELDS = ("image", "image_path")
# Far over any judge's context (32768 tokens): longer text is refused before it is tokenized.
MAX_RESPONSE_CHARS = 1 << 20
_DATA_URL = re.compile(r"data:(?P<type>[^;,]*)(?P<params>(;[^;,]*)*),", re.IGNORECASE)


def json_body(body: bytes) -> Any:
    try:
        return json.loads(body)
    except UnicodeDecodeError:
        raise BadInput("the body is not valid UTF-8") from None
    except json.JSONDecodeError as exc:
        raise BadInput(f"the body is not JSON ({exc.msg} at line {exc.lineno} column {exc.colno})") from None


def single(body: bytes, mode: str, image_root: Path | None) -> tuple[Item, Options]:
    """`/v1/score` or `/v1/compare`: one record and its options."""
    obj = _object(json_body(body), "the body")
    option = "expected_score" if mode == "pointwise" else "swap_check"
    options = Options(**{option: _flag(obj, option)})
    fields = {k: v for k, v in obj.items() if k != option}
    return item(fields, mode, image_root), options


def batch(body: bytes, mode: str, image_root: Path | None, max_items: int) -> tuple[list[Item | BadInput], Options]:
    """The batch form: `{"items": [record, ...], <option>}`; an item that is not a usable record is its
    own error, the others stand."""
    obj = _object(json_body(body), "the body")
    option = "expected_score" if mode == "pointwise" else "swap_check"
    _only(obj, ("items", option), "the body")
    items = obj.get("items")
    if not isinstance(items, list) or not items:
        raise BadInput("'items' must be a non-empty list of records")
    if len(items) > max_items:
        raise BadInput(f"{len(items)} items is over this service's batch limit of {max_items}; split the batch")
    parsed: list[Item | BadInput] = []
    for index, value in enumerate(items):
        try:
            parsed.append(item(_object(value, f"item {index}"), mode, image_root))
        except BadInput as exc:
            parsed.append(BadInput(f"record {index}: {exc}"))
    return parsed, Options(**{option: _flag(obj, option)})


def item(obj: dict[str, Any], mode: str, image_root: Path | None) -> Item:
    names = POINTWISE_FIELDS if mode == "pointwise" else PAIRWISE_FIELDS
    _only(obj, names + IMAGE_FIELDS, "the record", mode)
    missing = [n for n in names if n not in obj]
    if missing:
        raise BadInput(f"missing field {', '.join(repr(n) for n in missing)}")
    for name in names[1:]:  # the label's own check names its problem
        if not isinstance(obj[name], str):
            raise BadInput(f"field {name!r} must be a string, got {type(obj[name]).__name__}")
        if len(obj[name]) > MAX_RESPONSE_CHARS:
            raise BadInput(f"field {name!r} holds {len(obj[name])} characters, over the {MAX_RESPONSE_CHARS} this "
                           "service takes (no judge's context holds that much)")
    image, identity = _image(obj, image_root)
    try:
        label = prompts.normalize_label(obj["label"])
    except ValueError as exc:
        raise BadInput(str(exc)) from None
    record = {"image": image, "label": label, **{n: obj[n] for n in names[1:]}}
    return Item(record, (identity, label))


def decode_image(value: Any, field: str = "image") -> bytes:
    """Base64 or a `data:image/...;base64,` URL -> the image file's bytes."""
    if not isinstance(value, str) or not value:
        raise BadInput(f"{field!r} must be a non-empty string: base64 image data or a data: URL")
    text = value
    if text[:5].lower() == "data:":
        match = _DATA_URL.match(text)
        if match is None:
            raise BadInput(f"{field!r} is not a well-formed data: URL")
        params = [p.strip().lower() for p in match["params"].split(";") if p.strip()]
        if "base64" not in params:
            raise BadInput(f"{field!r}: a data: URL must carry base64 data (data:image/png;base64,...)")
        media = match["type"].strip().lower()
        if media and not media.startswith("image/"):
            raise BadInput(f"{field!r}: a data: URL of type {media!r} is not an image")
        text = text[match.end():]
    elif re.match(r"[a-z][a-z0-9+.-]*://", text[:16], re.IGNORECASE):
        raise BadInput(f"{field!r} is a URL; images are sent inline (base64 or a data: URL), this service fetches nothing")
    text = "".join(text.split())  # line breaks of MIME-style base64
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise BadInput(f"{field!r} is not valid base64") from None
    if not data:
        raise BadInput(f"{field!r} holds no bytes")
    return data


def _image(obj: dict[str, Any], image_root: Path | None) -> tuple[bytes | str, str]:
    """(what the judge loads, the image's identity for grouping)."""
    given = [f for f in IMAGE_FIELDS if f in obj]
    if len(given) != 1:
        raise BadInput("give the image as 'image' (base64 or a data: URL)"
                       + (" or as 'image_path' (inside the image root)" if image_root else "") + ", once")
    if given[0] == "image":
        data = decode_image(obj["image"])
        return data, "sha256:" + hashlib.sha256(data).hexdigest()
    if image_root is None:
        raise BadInput("'image_path' is off: this service was started without --image-root; send the image inline")
    try:
        path = resolve_image(obj["image_path"], Path(image_root).resolve(), within="the image root")
    except RecordProblem as exc:
        raise BadInput(str(exc)) from None
    return path, "path:" + path


def _object(value: Any, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise BadInput(f"{what} must be a JSON object, got {_json_type(value)}")
    return value


def _only(obj: dict[str, Any], allowed: tuple[str, ...], what: str, mode: str | None = None) -> None:
    unknown = [k for k in obj if k not in allowed]
    if unknown:
        hint = ""
        if mode == "pointwise" and any(k in ("response_a", "response_b") for k in unknown):
            hint = " (a pairwise record: this is a pointwise judge, use /v1/score with 'response')"
        elif mode == "pairwise" and "response" in unknown:
            hint = " (a pointwise record: this is a pairwise judge, use /v1/compare with 'response_a' and 'response_b')"
        raise BadInput(f"unknown field {', '.join(repr(k) for k in unknown)} in {what}{hint}; "
                       f"allowed: {', '.join(allowed)}")


def _flag(obj: dict[str, Any], name: str) -> bool:
    value = obj.get(name, False)
    if not isinstance(value, bool):
        raise BadInput(f"{name!r} must be true or false, got {_json_type(value)}")
    return value


def _json_type(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null",
            int: "a number", float: "a number"}.get(type(value), type(value).__name__)


# -- the OpenAI chat format --------------------------------------------------------------------------
CHAT_FIELDS = ("model", "messages", "temperature", "top_p", "n", "stream", "max_tokens", "max_completion_tokens",
               "seed", "user")


@dataclass
class ChatRequest:
    item: Item
    model: str | None


def chat(body: bytes, mode: str, new_token_limit: int) -> ChatRequest:
    """A `/v1/chat/completions` body -> the record its DFJ prompt holds.

    The judge answers the prompt it was trained on, greedily: the user turn must be one image and the
    DFJ prompt of the judge's mode (the template dfj ships, whose hash the artifact records); a system
    turn, if any, must be the template's default one. Sampling settings other than greedy are refused
    rather than ignored, as is streaming."""
    obj = _object(json_body(body), "the body")
    _only(obj, CHAT_FIELDS, "the body")
    if obj.get("stream"):
        raise BadInput("'stream' is not supported: the reply is the judge's whole verdict")
    if obj.get("n") not in (None, 1):
        raise BadInput("'n' must be 1: a judge gives one greedy verdict")
    if obj.get("temperature") not in (None, 0, 0.0):
        raise BadInput("'temperature' must be 0 or absent: the judge decodes greedily, as it was evaluated")
    if obj.get("top_p") not in (None, 1, 1.0):
        raise BadInput("'top_p' must be 1 or absent: the judge decodes greedily")
    for name in ("max_tokens", "max_completion_tokens"):
        value = obj.get(name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < new_token_limit):
            raise BadInput(f"{name!r} must be at least {new_token_limit} (the judge's output limit) or absent, got {value!r}")
    model = obj.get("model")
    if model is not None and not isinstance(model, str):
        raise BadInput("'model' must be a string")
    messages = obj.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadInput("'messages' must be a non-empty list")
    user: dict[str, Any] | None = None
    for index, message in enumerate(messages):
        message = _object(message, f"message {index}")
        role = message.get("role")
        if role == "system":
            if index != 0 or message.get("content") != prompts.DEFAULT_SYSTEM_PROMPT:
                raise BadInput("a system message must come first and be the chat template's default "
                               f"({prompts.DEFAULT_SYSTEM_PROMPT!r}): the judge was trained with it")
        elif role == "user" and user is None:
            user = message
        else:
            raise BadInput(f"message {index}: a judge request is one user message (an image and the DFJ "
                           f"{mode} prompt), optionally after the default system message; got role {role!r}")
    if user is None:
        raise BadInput("no user message")
    content = user.get("content")
    if not isinstance(content, list):
        raise BadInput("the user message's content must be a list of parts: one image_url part (a data: URL) "
                       "and the DFJ prompt as text")
    images, texts = [], []
    for index, part in enumerate(content):
        part = _object(part, f"content part {index}")
        kind = part.get("type")
        if kind == "image_url":
            url = part.get("image_url")
            url = url.get("url") if isinstance(url, dict) else url
            images.append(decode_image(url, f"content part {index} image_url"))
        elif kind == "text":
            if not isinstance(part.get("text"), str):
                raise BadInput(f"content part {index}: 'text' must be a string")
            texts.append(part["text"])
        else:
            raise BadInput(f"content part {index}: type {kind!r}; a judge request takes 'image_url' and 'text' parts")
    if len(images) != 1:
        raise BadInput(f"the user message must hold exactly one image, it holds {len(images)}")
    text = "".join(texts).replace("\r\n", "\n")
    fields = prompts.parse_prompt(mode, text)
    if fields is None:
        other = "pairwise" if mode == "pointwise" else "pointwise"
        why = (f" (it is the {other} prompt; this is a {mode} judge)" if prompts.parse_prompt(other, text) is not None
               else "")
        raise BadInput(f"the text is not the DFJ {mode} prompt this judge was trained on{why}; "
                       f"fill the template (sha256 {prompts.template_sha256(mode)[:12]}…, see GET /v1/info)")
    responses = ({"response": fields["candidate_response"]} if mode == "pointwise"
                 else {"response_a": fields["response_a"], "response_b": fields["response_b"]})
    try:
        label = prompts.normalize_label(fields["ground_truth_label"])
    except ValueError as exc:
        raise BadInput(str(exc)) from None
    record = {"image": images[0], "label": label, **responses}
    return ChatRequest(Item(record, ("sha256:" + hashlib.sha256(images[0]).hexdigest(), label)), model)
