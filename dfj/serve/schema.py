"""The service's contract for generated clients: its OpenAPI document, built from typed models of every
request body, response and error, for the routes of the judge it serves.

Handlers still parse bodies themselves (`dfj.serve.inputs`: every problem named, the record's own checks
are the library's); these models describe what they take and answer. The document depends on the
service's settings: `image_path` exists only with `--image-root`, the bearer scheme only with an API
key, and the judging routes are those of the judge's mode. Served at `/openapi.json`.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.json_schema import models_json_schema

from dfj.serve.inputs import MAX_RESPONSE_CHARS

Label = Literal["real", "fake", "edited"]
# A response a judge can rate: at most MAX_RESPONSE_CHARS characters, not blank, no NUL (the library's rule).
RESPONSE = dict(min_length=1, max_length=MAX_RESPONSE_CHARS, pattern=r"^[^\u0000]*[^\s\u0000][^\u0000]*$")
IMAGE = "The image file's bytes as base64, or a data: URL (data:image/png;base64,...). The service fetches nothing."
IMAGE_PATH = "A path inside the service's --image-root (no '..', no symlink out)."


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ScoreRequest(_Strict):
    """One detector response to rate (`/v1/score`)."""

    image: str = Field(min_length=1, description=IMAGE)
    label: Label = Field(description="The image's ground-truth label.")
    response: str = Field(description="The detector's response (untrusted text: it never becomes chat structure).", **RESPONSE)
    expected_score: bool = Field(False, description="Add the probability-weighted score (one teacher-forced pass).")


class CompareRequest(_Strict):
    """Two detector responses to compare (`/v1/compare`)."""

    image: str = Field(min_length=1, description=IMAGE)
    label: Label
    response_a: str = Field(**RESPONSE)
    response_b: str = Field(**RESPONSE)
    swap_check: bool = Field(False, description="Also judge B-vs-A and say whether the orders agree.")


class ScoreItem(_Strict):
    image: str = Field(min_length=1, description=IMAGE)
    label: Label
    response: str = Field(**RESPONSE)


class CompareItem(_Strict):
    image: str = Field(min_length=1, description=IMAGE)
    label: Label
    response_a: str = Field(**RESPONSE)
    response_b: str = Field(**RESPONSE)


BATCH_ITEMS = ("Records, judged in groups of one image and label. An item that is not a usable record (any "
               "JSON value) is answered in its place with its error; the others are judged.")


class ScoreBatchRequest(_Strict):
    items: list[ScoreItem | Any] = Field(min_length=1, description=BATCH_ITEMS)
    expected_score: bool = False


class CompareBatchRequest(_Strict):
    items: list[CompareItem | Any] = Field(min_length=1, description=BATCH_ITEMS)
    swap_check: bool = False


class Provenance(BaseModel):
    """Which judge gave the verdict, from which input, with which settings (docs/provenance.md)."""

    model_config = ConfigDict(extra="allow")
    run_id: str
    run: dict[str, Any]
    image_sha256: str
    responses_sha256: list[str]
    options: dict[str, bool]


class PointwiseVerdict(_Strict):
    score: int | None = Field(ge=1, le=5, description="None whenever error is set.")
    reasoning: str | None
    text: str = Field(description="The judge's whole output.")
    error: str | None = Field(description="Why there is no verdict (bad input, or output without a valid score).")
    expected_score: float | None = None
    provenance: Provenance | None = None


class PairwiseVerdict(_Strict):
    choice: Literal["A", "B"] | None = Field(description="None whenever error is set.")
    text: str
    error: str | None
    p_a: float | None = Field(None, ge=0, le=1, description="P(A) over A and B after <answer> (pairwise='answer').")
    swapped_choice: Literal["A", "B"] | None = None
    swap_consistent: bool | None = None
    provenance: Provenance | None = None


class PointwiseBatch(_Strict):
    verdicts: list[PointwiseVerdict] = Field(description="One per item, in order; a bad item carries its error.")


class PairwiseBatch(_Strict):
    verdicts: list[PairwiseVerdict]


class ErrorBody(_Strict):
    message: str
    type: str
    code: int


class Error(_Strict):
    """Every error, in the OpenAI shape its clients parse."""

    error: ErrorBody


class Health(_Strict):
    status: Literal["ok", "loading", "failed"]
    mode: Literal["pointwise", "pairwise"] | None = None
    runtime: str | None = None
    format: str | None = None
    quant: str | None = None
    error: str | None = None


class Info(BaseModel):
    """The artifact and the service (its keys grow with the artifact's manifest)."""

    model_config = ConfigDict(extra="allow")
    mode: Literal["pointwise", "pairwise"]
    source: str
    prompt_template_sha256: str
    max_new_tokens: int
    service: dict[str, Any]


class ImageUrl(_Strict):
    url: str = Field(description="A data: URL; the service fetches nothing.")


class ImagePart(_Strict):
    type: Literal["image_url"]
    image_url: ImageUrl


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "user"]
    content: str | list[ImagePart | TextPart]


class ChatRequest(_Strict):
    """OpenAI chat completions, as far as a judge takes them: one user turn holding one image and the DFJ
    prompt of the judge's mode, optionally after the chat template's default system turn; greedy."""

    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    temperature: float | None = Field(None, ge=0, le=0)
    top_p: float | None = Field(None, ge=1, le=1)
    n: int | None = Field(None, ge=1, le=1)
    stream: bool | None = Field(None, description="Only false: the reply is the whole verdict.")
    max_tokens: int | None = None
    max_completion_tokens: int | None = None


class ChatReplyMessage(_Strict):
    role: Literal["assistant"]
    content: str


class ChatChoice(_Strict):
    index: int
    message: ChatReplyMessage
    finish_reason: Literal["stop"]
    logprobs: None = None


class ChatCompletion(_Strict):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    dfj: PointwiseVerdict | PairwiseVerdict = Field(description="The verdict parsed from the text, as /v1/score or /v1/compare give it.")


MODELS = (ScoreRequest, CompareRequest, ScoreBatchRequest, CompareBatchRequest, PointwiseVerdict, PairwiseVerdict,
          PointwiseBatch, PairwiseBatch, Error, Health, Info, ChatRequest, ChatCompletion)
ERRORS = {
    "400": "The body's Content-Length is not a number.",
    "401": "Missing or wrong API key.",
    "413": "The body is over the service's limit (read and discarded up to a bound, then answered).",
    "415": "The body is not JSON (Content-Type: application/json).",
    "421": "On a loopback address: the Host header does not name this machine.",
    "422": "The request is not one this judge can take; the message names the field and the problem.",
    "500": "The judge failed on this record (the runtime, not the input).",
    "503": "The judge is loading, or the queue is full (Retry-After says when to retry).",
    "504": "Not judged within the service's time limit (--timeout).",
}


def openapi_document(mode: str, *, image_root: bool, api_key: bool, version: str) -> dict[str, Any]:
    """The OpenAPI 3.1 document of a service judging in `mode`."""
    _, definitions = models_json_schema([(m, "validation") for m in MODELS], ref_template="#/components/schemas/{model}")
    schemas = definitions["$defs"]
    if image_root:
        for name in ("ScoreRequest", "CompareRequest", "ScoreItem", "CompareItem"):
            _either_image_or_path(schemas[name])

    def ref(name: str) -> dict[str, Any]:
        return {"$ref": f"#/components/schemas/{name}"}

    def errors(*codes: str) -> dict[str, Any]:
        return {code: {"description": ERRORS[code], "content": {"application/json": {"schema": ref("Error")}}}
                for code in codes if code != "401" or api_key}

    judged = ("400", "401", "413", "415", "421", "422", "500", "503", "504")
    verdict = "PointwiseVerdict" if mode == "pointwise" else "PairwiseVerdict"
    single, batch = ("/v1/score", "ScoreRequest") if mode == "pointwise" else ("/v1/compare", "CompareRequest")
    batch_request = "ScoreBatchRequest" if mode == "pointwise" else "CompareBatchRequest"
    batch_reply = "PointwiseBatch" if mode == "pointwise" else "PairwiseBatch"

    def post(summary: str, request: str, reply: str, operation: str) -> dict[str, Any]:
        return {"post": {"summary": summary, "operationId": operation,
                         "requestBody": {"required": True, "content": {"application/json": {"schema": ref(request)}}},
                         "responses": {"200": {"description": "The verdict(s).",
                                               "content": {"application/json": {"schema": ref(reply)}}},
                                       **errors(*judged)}}}

    paths = {
        "/health": {"get": {"summary": "Whether the judge is loaded (open to every caller)", "operationId": "health",
                            "security": [],
                            "responses": {"200": {"description": "Serving.", "content": {"application/json": {"schema": ref("Health")}}},
                                          "503": {"description": "Loading, or failed to load.",
                                                  "content": {"application/json": {"schema": ref("Health")}}},
                                          **errors("421")}}},
        "/v1/info": {"get": {"summary": "The artifact and the service", "operationId": "info",
                             "responses": {"200": {"description": "What is served.", "content": {"application/json": {"schema": ref("Info")}}},
                                           **errors("401", "421", "503")}}},
        "/metrics": {"get": {"summary": "Prometheus metrics", "operationId": "metrics",
                             "responses": {"200": {"description": "Prometheus text format.", "content": {"text/plain": {"schema": {"type": "string"}}}},
                                           **errors("401", "421")}}},
        single: post(f"Judge one record ({mode})", batch, verdict, "score" if mode == "pointwise" else "compare"),
        f"{single}/batch": post(f"Judge several records ({mode})", batch_request, batch_reply,
                                "score_batch" if mode == "pointwise" else "compare_batch"),
        "/v1/chat/completions": post("OpenAI chat completions carrying the DFJ prompt", "ChatRequest", "ChatCompletion",
                                     "chat_completions"),
    }
    document: dict[str, Any] = {
        "openapi": "3.1.0",
        "info": {"title": "dfj judge service", "version": version,
                 "description": f"One DeepfakeJudge {mode} judge behind HTTP (docs/serve.md)."},
        "paths": paths,
        "components": {"schemas": schemas},
    }
    if api_key:
        document["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
        document["security"] = [{"bearer": []}]
    return document


def _either_image_or_path(schema: dict[str, Any]) -> None:
    """With --image-root a record gives its image inline or as a path under the root: exactly one."""
    schema["properties"]["image_path"] = {"type": "string", "minLength": 1, "description": IMAGE_PATH}
    schema["required"] = [name for name in schema["required"] if name != "image"]
    schema["oneOf"] = [{"required": ["image"]}, {"required": ["image_path"]}]
