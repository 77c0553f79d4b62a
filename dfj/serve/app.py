"""The routes of `dfj serve` (FastAPI), over one `Scheduler` that owns the loaded judge.

Handlers never run the model or parse a large body on the event loop: bodies are parsed in the thread
pool, judging happens on the scheduler's thread, and a handler only waits for its outcome, its client's
disconnect or its deadline, whichever comes first.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any, Callable

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect

from dfj import prompts
from dfj.judge import Judge
from dfj.serve import inputs
from dfj.serve.config import ServeConfig, is_loopback
from dfj.serve.guard import Guard, Observe
from dfj.serve.inputs import BadInput, Options
from dfj.serve.metrics import Metrics
from dfj.serve.scheduler import Failure, QueueFull, Scheduler, Work
from dfj.verdicts import failure

LOADING_RETRY_AFTER = 5


class Service:
    """One judge behind HTTP: `asgi` is what uvicorn runs."""

    def __init__(self, config: ServeConfig, load: Callable[[], Judge], on_load_failed: Callable[[str], None]) -> None:
        self.config = config
        self.metrics = Metrics()
        self.scheduler = Scheduler(config.max_queue, self.metrics)
        self.api_key = config.api_key()
        self._load, self._on_load_failed = load, on_load_failed
        self.app = self._routes()
        methods: dict[str, set[str]] = {}
        for route in self.app.routes:
            methods.setdefault(route.path, set()).update(getattr(route, "methods", None) or ())
        self.asgi = Observe(Guard(self.app, self.metrics, api_key=self.api_key, max_active=config.max_active,
                                  max_body=config.max_body_bytes, loopback=is_loopback(config.host),
                                  retry_after=self.scheduler.retry_after, methods=methods), self.metrics)

    @property
    def judge(self) -> Judge | None:
        return self.scheduler.judge if self.scheduler.ready.is_set() else None

    def _routes(self) -> FastAPI:
        from contextlib import asynccontextmanager

        @asynccontextmanager
        async def lifespan(app: FastAPI):
            self.scheduler.start(self._load, self._on_load_failed)
            yield
            self.scheduler.stop()

        # No docs pages (they load scripts from a CDN), no CORS: browsers on other origins get nothing. The
        # OpenAPI document is dfj.serve.schema's, for the judge's mode and the service's settings.
        app = FastAPI(title="dfj judge service", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)

        @app.get("/openapi.json")
        async def openapi() -> Response:
            judge = self.judge
            if judge is None:
                return _loading()
            return JSONResponse(self._openapi(judge.mode))

        @app.get("/health")
        async def health() -> Response:
            judge = self.judge
            if judge is None:
                status = {"status": "loading"} if self.scheduler.load_error is None else {
                    "status": "failed", "error": self.scheduler.load_error}
                return JSONResponse(status, 503, headers={"retry-after": str(LOADING_RETRY_AFTER)})
            manifest = judge.manifest
            return JSONResponse({"status": "ok", "mode": judge.mode, "runtime": judge.runtime_name,
                                 "format": manifest.format if manifest else judge.info.get("kind"),
                                 "quant": manifest.quant if manifest else "none"})

        @app.get("/v1/info")
        async def info() -> Response:
            judge = self.judge
            if judge is None:
                return _loading()
            return JSONResponse(self._info(judge))

        @app.get("/metrics")
        async def metrics() -> Response:
            return Response(self.metrics.render(), media_type=self.metrics.content_type)

        root = self.config.image_root
        max_batch = self.config.max_batch

        @app.post("/v1/score")
        async def score(request: Request) -> Response:
            return await self._single(request, "pointwise", lambda body: inputs.single(body, "pointwise", root))

        @app.post("/v1/compare")
        async def compare(request: Request) -> Response:
            return await self._single(request, "pairwise", lambda body: inputs.single(body, "pairwise", root))

        @app.post("/v1/score/batch")
        async def score_batch(request: Request) -> Response:
            return await self._batch(request, "pointwise", lambda body: inputs.batch(body, "pointwise", root, max_batch))

        @app.post("/v1/compare/batch")
        async def compare_batch(request: Request) -> Response:
            return await self._batch(request, "pairwise", lambda body: inputs.batch(body, "pairwise", root, max_batch))

        @app.post("/v1/chat/completions")
        async def chat(request: Request) -> Response:
            return await self._chat(request)

        return app

    # -- the judging routes ----------------------------------------------------------------------------
    async def _single(self, request: Request, mode: str, parse) -> Response:
        def items(body: bytes):
            item, options = parse(body)
            return [item], options

        answer = await self._judge(request, mode, items)
        if isinstance(answer, Response):
            return answer
        return _verdict_response(answer[0])

    async def _batch(self, request: Request, mode: str, parse) -> Response:
        answer = await self._judge(request, mode, parse)
        if isinstance(answer, Response):
            return answer
        verdicts = []
        for index, outcome in enumerate(answer):
            if isinstance(outcome, (BadInput, Failure)):
                message = str(outcome)
                message = message if message.startswith("record ") else f"record {index}: {message}"
                verdicts.append(failure(mode, message).to_dict())
            else:
                verdicts.append(outcome.to_dict())
        return JSONResponse({"verdicts": verdicts})

    async def _chat(self, request: Request) -> Response:
        judge = self.judge
        if judge is None:
            return _loading()
        mode = judge.mode
        recorded = (judge.manifest.prompt_templates if judge.manifest else {}).get(mode)
        if recorded and recorded != prompts.template_sha256(mode):
            return _error(422, f"this artifact was exported with another {mode} prompt template (sha256 {recorded[:12]}…) "
                               f"than the one requests are checked against ({prompts.template_sha256(mode)[:12]}…): "
                               "use /v1/score or /v1/compare, or re-export it with this dfj")
        limit = judge.new_token_limit
        model: list[str | None] = [None]

        def items(body: bytes):
            request_ = inputs.chat(body, mode, limit)
            model[0] = request_.model
            return [request_.item], Options()

        answer = await self._judge(request, mode, items)
        if isinstance(answer, Response):
            return answer
        outcome = answer[0]
        if isinstance(outcome, (BadInput, Failure)):
            return _verdict_response(outcome)
        return JSONResponse({
            "id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
            "model": model[0] or judge.source,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": outcome.text},
                         "finish_reason": "stop", "logprobs": None}],
            # Extra, outside the OpenAI schema: the verdict parsed from the text, as /v1/score gives it.
            "dfj": outcome.to_dict(),
        })

    async def _judge(self, request: Request, mode: str, parse) -> list[Any] | Response:
        """Parse, queue, wait: the outcomes of the request's records, or the Response that ends it early."""
        arrived = time.monotonic()
        judge = self.judge
        if judge is None:
            return _loading()
        if judge.mode != mode:
            other = "/v1/compare" if judge.mode == "pairwise" else "/v1/score"
            return _error(422, f"this is a {judge.mode} judge; use {other}")
        try:
            body = await request.body()
        except ClientDisconnect:
            return Response(status_code=499)
        try:
            items, options = await run_in_threadpool(parse, body)
        except BadInput as exc:
            return _error(422, str(exc))
        loop = asyncio.get_running_loop()
        work = Work(items, options, deadline=arrived + self.config.timeout_s, future=loop.create_future(), loop=loop)
        try:
            self.scheduler.submit(work)
        except QueueFull as exc:
            self.metrics.rejected.labels("queue_full").inc()
            return _error(503, str(exc), "server_busy", {"retry-after": str(exc.retry_after)})
        disconnect = asyncio.ensure_future(_disconnected(request))
        try:
            done, _ = await asyncio.wait({work.future, disconnect}, timeout=max(0.0, work.deadline - time.monotonic()),
                                         return_when=asyncio.FIRST_COMPLETED)
        finally:
            disconnect.cancel()
        if work.future.done():
            return work.future.result()
        if disconnect in done:
            self.scheduler.abandon(work, "disconnected")
            return Response(status_code=499)
        self.scheduler.abandon(work, "deadline")
        return _error(504, f"not judged within this service's {self.config.timeout_s:g} s limit", "timeout")

    def _openapi(self, mode: str) -> dict[str, Any]:
        from dfj.serve.schema import openapi_document
        from dfj.version import __version__

        if getattr(self, "_document", None) is None:
            self._document = openapi_document(mode, image_root=self.config.image_root is not None,
                                              api_key=self.api_key is not None, version=__version__)
        return self._document

    def _info(self, judge: Judge) -> dict[str, Any]:
        manifest = judge.manifest
        summary: dict[str, Any] = {"mode": judge.mode, "source": judge.source, **judge.describe(),
                                   "prompt_template_sha256": prompts.template_sha256(judge.mode),
                                   "max_new_tokens": judge.new_token_limit}
        if manifest is not None:
            summary.update(format=manifest.format, quant=manifest.quant, artifact_source=manifest.source,
                           parity=manifest.parity, pixels=manifest.pixels, chain=manifest.chain,
                           dfj_version=manifest.dfj_version, created=manifest.created,
                           recorded_prompt_template_sha256=manifest.prompt_templates.get(judge.mode))
        config = self.config
        summary["service"] = {"max_queue": config.max_queue, "max_body_mb": config.max_body_mb,
                              "timeout_s": config.timeout_s, "max_batch": config.max_batch,
                              "image_paths": config.image_root is not None, "api_key": self.api_key is not None}
        return summary


async def _disconnected(request: Request) -> None:
    """Returns once the client has closed its connection (the body is already read)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def _verdict_response(outcome: Any) -> Response:
    if isinstance(outcome, BadInput):
        return _error(422, str(outcome))
    if isinstance(outcome, Failure):
        return _error(500, f"the judge failed on this record: {outcome}", "server_error")
    return JSONResponse(outcome.to_dict())


def _error(status: int, message: str, kind: str = "invalid_request_error", headers: dict[str, str] | None = None) -> Response:
    return JSONResponse({"error": {"message": message, "type": kind, "code": status}}, status, headers=headers)


def _loading() -> Response:
    return _error(503, "the judge is still loading", "server_busy", {"retry-after": str(LOADING_RETRY_AFTER)})
