"""`dfj serve` as its clients see it: a real uvicorn server on a free loopback port, serving a trained
tiny judge, driven with real HTTP clients (httpx, the `openai` client, raw sockets).

Two `dfj serve` processes, shared by the tests: a pointwise one with an API key and an image root, and
a pairwise one with no key. Each is stopped when its tests are done, and dies with the test process if
that dies first. The tests of loading, queueing, leaving and deadlines need a judge that is busy for as
long as they say, on any machine: they serve the same routes in-process (`HeldService`), with the judge
held at a gate the test opens, so nothing they assert waits on how fast this machine judges.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
httpx = pytest.importorskip("httpx", reason="the test extra installs httpx")

from serving import KEY, Service, _free_port  # noqa: E402


class HeldJudge:
    """The real judge behind a gate: `run_group` waits until the test opens `gate`, then judges. While it
    waits, what is queued behind it stays queued, however fast this machine judges."""

    def __init__(self, judge) -> None:
        self.judge = judge
        self.gate = threading.Event()
        self.held = threading.Event()  # a group reached the gate

    def __getattr__(self, name: str):
        return getattr(self.judge, name)

    def run_group(self, group, *, expected_score=False, cancel=None):
        self.held.set()
        if not self.gate.wait(HOLD_LIMIT_S):
            raise AssertionError(f"the test never opened the gate in {HOLD_LIMIT_S} s")
        return self.judge.run_group(group, expected_score=expected_score, cancel=cancel)


HOLD_LIMIT_S = 120


class HeldService(Service):
    """`dfj serve`'s application (dfj.serve.app.Service) on uvicorn in a thread of this process, loading
    a `HeldJudge`: its load waits for `loaded`, its judging for the judge's gate."""

    def __init__(self, judge, folder: Path, key: str | None = None, **settings) -> None:
        import uvicorn

        from dfj.serve.app import Service as App
        from dfj.serve.config import ServeConfig

        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.key = key
        key_file = None
        if key:
            key_file = folder / "key"
            key_file.write_text(key + "\n")
            key_file.chmod(0o600)
        self.judge = HeldJudge(judge)
        self.loaded = threading.Event()

        def load():
            if not self.loaded.wait(HOLD_LIMIT_S):
                raise AssertionError(f"the test never let the judge load in {HOLD_LIMIT_S} s")
            return self.judge

        self.app = App(ServeConfig("held", port=self.port, api_key_file=key_file, **settings), load, lambda message: None)
        self.server = uvicorn.Server(uvicorn.Config(self.app.asgi, host="127.0.0.1", port=self.port, log_level="warning",
                                                    lifespan="on", timeout_graceful_shutdown=5))
        self.thread = threading.Thread(target=self.server.run, name="held-service", daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 300
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "the in-process service did not start"
            time.sleep(0.01)
        self.health_seen = []
        self.client = httpx.Client(base_url=self.url, timeout=300, headers=self.auth())

    def wait_ready(self) -> None:
        self.loaded.set()
        deadline = time.monotonic() + 300
        while self.client.get("/health").status_code != 200:
            assert time.monotonic() < deadline, "the held judge did not become ready"
            time.sleep(0.01)

    def __enter__(self) -> "HeldService":
        return self

    def stop(self) -> None:
        self.loaded.set()
        self.judge.gate.set()
        self.client.close()
        self.server.should_exit = True
        self.thread.join(30)
        assert not self.thread.is_alive(), "the in-process service did not stop"

    def wait_for(self, what, condition, limit_s: float = 60) -> None:
        """Until `condition()` holds (a state the test brought about, reached in bounded time)."""
        deadline = time.monotonic() + limit_s
        while not condition():
            assert time.monotonic() < deadline, f"not reached in {limit_s} s: {what}"
            time.sleep(0.01)


def _records(mode: str, n: int) -> list[dict]:
    from dfj.data import read_split
    from dfj.tiny import trained_tiny_split

    out = []
    for record in read_split(trained_tiny_split(mode)).records[:n]:
        fields = {"label": record.label}
        fields.update({"response": record.response} if mode == "pointwise"
                      else {"response_a": record.response_a, "response_b": record.response_b})
        out.append({"path": record.image, "fields": fields})
    return out


def _inline(record: dict) -> dict:
    return {"image": base64.b64encode(Path(record["path"]).read_bytes()).decode(), **record["fields"]}


# Records judged together run as one batch, whose fp32 rounding depends on the CPU's kernels: equal to
# one-at-a-time calls to the last bit with AVX-512 oneDNN, not with AVX2 kernels (measured 4.2e-7 in p_a).
# Where a service groups what the local judge ran alone, floats agree within this, all else exactly.
GROUPED_FLOAT_ATOL = 1e-5


def _same_verdicts(got: list[dict], expected: list[dict]) -> bool:
    def apart(verdict: dict) -> tuple[dict, dict]:
        floats = {k: v for k, v in verdict.items() if isinstance(v, float)}
        return {k: v for k, v in verdict.items() if k not in floats}, floats

    for one, other in zip(got, expected, strict=True):
        (rest, floats), (rest_expected, floats_expected) = apart(one), apart(other)
        assert rest == rest_expected and floats.keys() == floats_expected.keys(), (one, other)
        assert all(abs(floats[k] - floats_expected[k]) <= GROUPED_FLOAT_ATOL for k in floats), (floats, floats_expected)
    return True


def _expected(judge, record: dict, **options) -> dict:
    fields = record["fields"]
    if judge.mode == "pointwise":
        return judge.score(record["path"], fields["label"], fields["response"], **options).to_dict()
    return judge.compare(record["path"], fields["label"], fields["response_a"], fields["response_b"], **options).to_dict()


@pytest.fixture(scope="module")
def corpus(module_dir):
    from bad_inputs import build_corpus

    return build_corpus(module_dir("serve-corpus"))


@pytest.fixture(scope="module")
def pointwise_service(module_dir, corpus):
    from dfj.tiny import trained_tiny_judge

    with Service(trained_tiny_judge("pointwise"), module_dir("serve-pointwise"), "--max-queue", "8",
                 "--image-root", str(corpus), key=KEY) as service:
        yield service


@pytest.fixture(scope="module")
def pairwise_service(module_dir):
    from dfj.tiny import trained_tiny_judge

    with Service(trained_tiny_judge("pairwise"), module_dir("serve-pairwise")) as service:
        yield service


@pytest.fixture(scope="module")
def local(judges):
    from dfj.tiny import trained_tiny_judge

    return lambda mode: judges(trained_tiny_judge(mode))


# -- health, info -------------------------------------------------------------------------------------
def test_health_is_503_while_the_judge_loads_then_200(local, tmp_path):
    with HeldService(local("pointwise"), tmp_path, key=KEY) as service:
        for route in ("/health", "/v1/info"):
            loading = httpx.get(service.url + route, headers=service.auth(), timeout=120)
            assert loading.status_code == 503 and int(loading.headers["retry-after"]) >= 1, loading.text
        assert httpx.get(service.url + "/health", timeout=120).json() == {"status": "loading"}
        service.wait_ready()
        assert httpx.get(service.url + "/health", timeout=120).json()["status"] == "ok"


def test_health_says_what_is_served(pointwise_service):
    assert pointwise_service.health_seen[-1] == 200
    body = httpx.get(pointwise_service.url + "/health", timeout=120).json()  # open to callers without the key
    assert body == {"status": "ok", "mode": "pointwise", "runtime": "torch", "format": "adapter", "quant": "none"}


def test_info_summarises_the_artifact_and_the_service(pointwise_service):
    from dfj import prompts

    info = pointwise_service.client.get("/v1/info").json()
    assert info["mode"] == "pointwise" and info["format"] == "adapter"
    assert info["prompt_template_sha256"] == prompts.template_sha256("pointwise")
    assert info["pixels"]["max_pixels"] > info["pixels"]["min_pixels"] > 0
    assert info["service"] == {"max_queue": 8, "max_body_mb": 20.0, "timeout_s": 120.0, "max_batch": 64,
                               "image_paths": True, "api_key": True}


# -- verdicts equal the in-process Judge's ----------------------------------------------------------------
@pytest.mark.parametrize("mode, route, option", [("pointwise", "/v1/score", "expected_score"),
                                                 ("pairwise", "/v1/compare", "swap_check")])
def test_verdicts_over_http_equal_the_in_process_judge(mode, route, option, pointwise_service, pairwise_service, local):
    service = pointwise_service if mode == "pointwise" else pairwise_service
    for record in _records(mode, 3):
        answer = service.client.post(route, json={**_inline(record), option: True})
        assert answer.status_code == 200, answer.text
        assert answer.json() == _expected(local(mode), record, **{option: True})
        # Provenance included: the service's verdict names the judge, the image bytes and the options.
        provenance = answer.json()["provenance"]
        assert provenance["run"]["artifact"]["mode"] == mode and provenance["options"] == {option: True}
        assert provenance["image_sha256"] == "sha256:" + hashlib.sha256(Path(record["path"]).read_bytes()).hexdigest()


@pytest.mark.parametrize("mode", ["pointwise", "pairwise"])
def test_a_batch_answers_one_verdict_per_item_in_order_and_a_bad_item_gets_its_error(mode, pointwise_service,
                                                                                     pairwise_service, local):
    service = pointwise_service if mode == "pointwise" else pairwise_service
    records = _records(mode, 4)
    items = [_inline(r) for r in records]
    items.insert(2, {**items[0], "label": "genuine"})
    items.insert(4, {**items[0], "image": "not base64!"})
    route = "/v1/score/batch" if mode == "pointwise" else "/v1/compare/batch"
    answer = service.client.post(route, json={"items": items})
    assert answer.status_code == 200, answer.text
    verdicts = answer.json()["verdicts"]
    assert len(verdicts) == len(items)
    assert "record 2: unknown label 'genuine'" in verdicts[2]["error"]
    assert verdicts[4]["error"] == "record 4: 'image' is not valid base64"
    good = [v for i, v in enumerate(verdicts) if i not in (2, 4)]
    assert _same_verdicts(good, [_expected(local(mode), r) for r in records])


def test_the_openai_client_gets_the_judges_text_from_chat_completions(pointwise_service, local):
    openai = pytest.importorskip("openai")
    from dfj import prompts

    client = openai.OpenAI(base_url=pointwise_service.url + "/v1", api_key=KEY, max_retries=0)
    record = _records("pointwise", 1)[0]
    data = base64.b64encode(Path(record["path"]).read_bytes()).decode()
    text = prompts.render_pointwise(record["fields"]["label"], record["fields"]["response"])
    reply = client.chat.completions.create(model="dfj-judge", messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{data}"}},
        {"type": "text", "text": text}]}])
    assert reply.choices[0].message.content == _expected(local("pointwise"), record)["text"]
    assert reply.choices[0].finish_reason == "stop" and reply.model == "dfj-judge"
    with pytest.raises(openai.UnprocessableEntityError, match="not the DFJ pointwise prompt"):
        client.chat.completions.create(model="dfj-judge", messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{data}"}},
            {"type": "text", "text": "Is this image fake? Answer with <score>5</score>."}]}])
    with pytest.raises(openai.UnprocessableEntityError, match="fetches nothing"):
        client.chat.completions.create(model="dfj-judge", messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "http://169.254.169.254/latest/meta-data"}},
            {"type": "text", "text": text}]}])


def test_pairwise_chat_completions_answer_the_judges_verdict(pairwise_service, local):
    from dfj import prompts

    record = _records("pairwise", 1)[0]
    data = base64.b64encode(Path(record["path"]).read_bytes()).decode()
    fields = record["fields"]
    text = prompts.render_pairwise(fields["label"], fields["response_a"], fields["response_b"])
    answer = pairwise_service.client.post("/v1/chat/completions", json={"model": "x", "messages": [
        {"role": "system", "content": prompts.DEFAULT_SYSTEM_PROMPT},
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64," + data}},
                                     {"type": "text", "text": text}]}]})
    assert answer.status_code == 200, answer.text
    assert answer.json()["choices"][0]["message"]["content"] == _expected(local("pairwise"), record)["text"]
    assert answer.json()["dfj"]["provenance"]["run_id"] == local("pairwise").run_id


# -- bounded: the judge held at its gate, so the queue is in the state each test asserts -------------------
def test_64_concurrent_requests_against_a_queue_of_8_get_200_or_503_and_every_200_is_right(local, tmp_path):
    records = _records("pointwise", 4)
    expected = [_expected(local("pointwise"), r) for r in records]
    bodies = [_inline(r) for r in records]
    with HeldService(local("pointwise"), tmp_path, key=KEY, max_queue=8) as service:
        service.wait_ready()

        def call(i: int):
            with httpx.Client(base_url=service.url, timeout=120, headers=service.auth()) as client:
                answer = client.post("/v1/score", json=bodies[i % 4])
                return i, answer.status_code, answer.headers.get("retry-after"), answer.json()

        with ThreadPoolExecutor(64) as pool:
            calls = [pool.submit(call, i) for i in range(64)]
            # Held: the records at the gate and 8 queued requests wait; every other request is refused.
            service.wait_for("a full queue and every other request refused", lambda: (
                service.metric("dfj_queue_depth") == 8 and service.judge.held.is_set()
                and sum(c.done() for c in calls) == 64 - 8 - service.metric("dfj_in_flight_records")))
            service.judge.gate.set()
            results = [c.result() for c in calls]
        statuses = [status for _, status, _, _ in results]
        assert set(statuses) <= {200, 503}, statuses
        assert statuses.count(200) >= 9 and statuses.count(503) >= 64 - 8 - 10, statuses  # a group holds 10 at most
        for i, status, retry_after, body in results:
            if status == 200:
                assert _same_verdicts([body], [expected[i % 4]])
            else:
                assert int(retry_after) >= 1 and body["error"]["code"] == 503
        assert service.metric("dfj_records_total", outcome="runtime_error") == 0
        # Refused at the queue, or before reading the body once 2 x 8 + 8 requests are held (`max_active`).
        refused = sum(service.metric("dfj_rejected_requests_total", reason=r) for r in ("queue_full", "busy"))
        assert refused == statuses.count(503)
        assert service.client.post("/v1/score", json=bodies[0]).json() == expected[0]


def test_a_client_that_leaves_while_queued_is_never_judged(local, tmp_path):
    records = _records("pointwise", 10)
    batch = {"items": [_inline(r) for r in records]}
    with HeldService(local("pointwise"), tmp_path, key=KEY) as service:
        service.wait_ready()
        with ThreadPoolExecutor(1) as pool:
            running = pool.submit(service.client.post, "/v1/score/batch", json=batch)
            service.wait_for("the batch at the gate", service.judge.held.is_set)
            body = json.dumps(_inline(records[0])).encode()
            with socket.create_connection(("127.0.0.1", service.port)) as sock:
                sock.sendall(b"POST /v1/score HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\n"
                             + f"authorization: Bearer {KEY}\r\ncontent-length: {len(body)}\r\n\r\n".encode() + body)
                service.wait_for("the request queued", lambda: service.metric("dfj_queue_depth") == 1)
            service.wait_for("the departed client's request taken out of the queue", lambda: service.metric(
                "dfj_abandoned_records_total", reason="disconnected", stage="queued") == 1)
            assert service.metric("dfj_queue_depth") == 0
            service.judge.gate.set()
            assert running.result().status_code == 200
        judged = sum(service.metric("dfj_records_total", outcome=o) for o in ("verdict", "unparsed"))
        assert judged == len(records)  # the batch's records, not the one whose client left


def test_a_request_past_its_deadline_gets_504_and_the_service_goes_on(local, tmp_path):
    records = _records("pairwise", 20)  # two images: two groups of 10
    with HeldService(local("pairwise"), tmp_path, timeout_s=1) as service:
        service.wait_ready()
        with ThreadPoolExecutor(2) as pool:
            first = pool.submit(service.client.post, "/v1/compare/batch", json={"items": [_inline(r) for r in records]})
            service.wait_for("the batch's first group at the gate", service.judge.held.is_set)
            queued = pool.submit(service.client.post, "/v1/compare", json=_inline(records[0]))
            assert queued.result().status_code == 504 and first.result().status_code == 504
        assert service.metric("dfj_abandoned_records_total", reason="deadline", stage="queued") == 1
        service.judge.gate.set()
        # Nobody waits for the batch any more: its group at the gate and the one after it never run.
        service.wait_for("the batch given up", lambda: service.metric(
            "dfj_abandoned_records_total", reason="deadline", stage="running") == len(records))
        assert service.metric("dfj_in_flight_records") == 0
        assert sum(service.metric("dfj_records_total", outcome=o) for o in ("verdict", "unparsed")) == 0
        answer = service.client.post("/v1/compare", json=_inline(records[1]))
        assert answer.status_code == 200 and answer.json() == _expected(local("pairwise"), records[1])


def test_a_100_mb_body_is_refused_unread(pointwise_service):
    service = pointwise_service
    peak_before = _peak_rss_mb(service.proc.pid)
    with socket.create_connection(("127.0.0.1", service.port)) as sock:
        sock.sendall(b"POST /v1/score HTTP/1.1\r\nhost: localhost\r\ncontent-type: application/json\r\n"
                     + f"authorization: Bearer {KEY}\r\ncontent-length: {100 << 20}\r\n\r\n".encode() + b"{" * 4096)
        reply = sock.recv(65536).decode()
    assert reply.startswith("HTTP/1.1 413"), reply
    # Chunked, no declared length: cut off at the cap, not read to the end.
    sent = 0
    chunk = b"0" * (1 << 20)
    with socket.create_connection(("127.0.0.1", service.port)) as sock:
        sock.sendall(b"POST /v1/score HTTP/1.1\r\nhost: localhost\r\ncontent-type: application/json\r\n"
                     + f"authorization: Bearer {KEY}\r\ntransfer-encoding: chunked\r\n\r\n".encode())
        with contextlib.suppress(OSError):
            while sent < 100 << 20:
                sock.sendall(b"%x\r\n" % len(chunk) + chunk + b"\r\n")
                sent += len(chunk)
        sock.settimeout(10)
        reply = sock.recv(65536).decode()
    assert reply.startswith("HTTP/1.1 413"), reply
    assert sent < 100 << 20
    assert _peak_rss_mb(service.proc.pid) - peak_before < 80  # the 20 MB cap read at most, copies included
    assert service.metric("dfj_rejected_requests_total", reason="body_too_large") >= 2
    assert service.client.get("/health").status_code == 200


def _peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


# -- bad input ------------------------------------------------------------------------------------------
def _corpus_request(case, corpus: Path) -> bytes:
    """The corpus line as a /v1/score body: its image path as `image_path` under the image root."""
    raw = _corpus_lines(corpus)[case.name]
    try:
        obj = json.loads(raw.decode("utf-8").removeprefix("\ufeff"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return raw
    if isinstance(obj, dict) and "image" in obj:
        obj["image_path"] = obj.pop("image")
    return json.dumps(obj).encode()


def _corpus_lines(corpus: Path) -> dict[str, bytes]:
    from bad_inputs import CASES

    lines = (corpus / "data.jsonl").read_bytes().split(b"\n")
    return {case.name: line for case, line in zip(CASES, lines)}


# The record reached the library's checks: the answer carries the library's own message.
LIBRARY_CHECKED = ("zero_byte", "truncated_png", "truncated_jpeg", "corrupt_png", "text_as_png", "pdf_as_jpeg",
                   "bomb_huge", "bomb_over_guard", "aspect_300", "missing_image", "image_is_directory", "absolute_path", "nul_in_path", "image_wrong_type", "unknown_label",
                   "label_wrong_type", "empty_response", "whitespace_response", "huge_response", "nul_response")


def test_the_bad_input_corpus_over_http_is_answered_4xx_or_judged_and_the_service_goes_on(pointwise_service, corpus, local):
    from bad_inputs import CASES, ERROR

    service = pointwise_service
    outcomes = {}
    for case in CASES:
        answer = service.client.post("/v1/score", content=_corpus_request(case, corpus),
                                     headers={"content-type": "application/json"})
        outcomes[case.name] = answer
        assert answer.status_code in (200, 413, 422), (case.name, answer.status_code, answer.text)
        body = answer.json()
        if case.expect[0] == ERROR:
            assert answer.status_code != 200, (case.name, body)
            if case.name in LIBRARY_CHECKED:
                assert case.expect[1] in body["error"]["message"], (case.name, body)
        else:
            assert answer.status_code in (200, 422), (case.name, body)
            if answer.status_code == 200:
                assert body["text"], (case.name, body)
    judged = [c.name for c in CASES if outcomes[c.name].status_code == 200]
    assert len(judged) >= 15, judged  # the accepted image kinds, tags, forged turn, placeholders, BOM, CRLF
    record = _records("pointwise", 1)[0]
    assert service.client.post("/v1/score", json=_inline(record)).json() == _expected(local("pointwise"), record)


def test_image_paths_stay_inside_the_image_root(pointwise_service, corpus, tmp_path):
    (corpus.parent / "outside.png").write_bytes(b"x")
    for path, message in [("../outside.png", "escapes the image root"), ("images/link.png", "escapes the image root"),
                          ("/etc/passwd", "is absolute"), ("images/../../outside.png", "escapes the image root")]:
        answer = pointwise_service.client.post("/v1/score", json={"image_path": path, "label": "fake", "response": "r"})
        assert answer.status_code == 422 and message in answer.json()["error"]["message"], (path, answer.text)


def test_image_paths_are_refused_without_an_image_root(pairwise_service):
    answer = pairwise_service.client.post("/v1/compare", json={"image_path": "a.png", "label": "fake",
                                                               "response_a": "a", "response_b": "b"})
    assert answer.status_code == 422 and "started without --image-root" in answer.json()["error"]["message"]


# -- safe by default -------------------------------------------------------------------------------------
def test_a_wrong_or_missing_key_is_401(pointwise_service):
    record = _inline(_records("pointwise", 1)[0])
    for headers in ({}, {"authorization": "Bearer wrong-key-0123456789"}, {"authorization": f"Basic {KEY}"},
                    {"x-api-key": KEY[:-1]}):
        answer = httpx.post(pointwise_service.url + "/v1/score", json=record, headers=headers, timeout=120)
        assert answer.status_code == 401 and answer.headers["www-authenticate"] == "Bearer"
    assert httpx.get(pointwise_service.url + "/metrics", timeout=120).status_code == 401
    judged = httpx.post(pointwise_service.url + "/v1/score", json=record, headers={"x-api-key": KEY}, timeout=300)
    assert judged.status_code == 200


def test_a_browser_page_cannot_use_the_service(pairwise_service):
    record = _inline(_records("pairwise", 1)[0])
    # A cross-origin form post (no preflight) is text/plain: refused. No CORS headers are ever sent.
    answer = pairwise_service.client.post("/v1/compare", content=json.dumps(record), headers={
        "content-type": "text/plain", "origin": "https://evil.example"})
    assert answer.status_code == 415 and "access-control-allow-origin" not in answer.headers
    preflight = pairwise_service.client.options("/v1/compare", headers={
        "origin": "https://evil.example", "access-control-request-method": "POST"})
    assert "access-control-allow-origin" not in preflight.headers
    # A page whose DNS name was rebound to 127.0.0.1 sends its own Host: refused.
    rebound = pairwise_service.client.post("/v1/compare", json=record, headers={"host": "evil.example:8731"})
    assert rebound.status_code == 421


def test_a_non_loopback_address_without_a_key_refuses_to_start(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "dfj.cli", "serve", str(tmp_path), "--host", "0.0.0.0"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "refusing to listen on 0.0.0.0" in proc.stderr and "--api-key-file" in proc.stderr


def test_metrics_count_requests_by_route_and_status(pointwise_service):
    service = pointwise_service
    before = service.metric("dfj_requests_total", route="/v1/score", status="422")
    service.client.post("/v1/score", json={"label": "fake"})
    text = service.client.get("/metrics").text
    assert service.metric("dfj_requests_total", route="/v1/score", status="422") == before + 1
    for name in ("dfj_queue_depth", "dfj_in_flight_records", "dfj_request_seconds_bucket", "dfj_records_total",
                 "dfj_abandoned_records_total", "dfj_ready 1.0"):
        assert name in text


def test_a_service_holding_its_limit_of_requests_still_answers_reads():
    """The `max_active` bound refuses judging work (POST) with 503; a scrape of /metrics or /v1/info while
    the service is full is answered (it was refused, so a monitor saw nothing exactly when it mattered)."""
    import asyncio

    from dfj.serve.guard import Guard
    from dfj.serve.metrics import Metrics

    async def app(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    async def status_of(guard: Guard, method: str, path: str) -> int:
        sent: list[dict] = []

        async def receive():
            return {"type": "http.request", "body": b"{}", "more_body": False}

        async def send(message):
            sent.append(message)

        headers = [(b"host", b"127.0.0.1"), (b"content-type", b"application/json"), (b"content-length", b"2")]
        await guard({"type": "http", "method": method, "path": path, "headers": headers}, receive, send)
        return sent[0]["status"]

    metrics = Metrics()
    guard = Guard(app, metrics, api_key=None, max_active=1, max_body=1 << 20, loopback=True, retry_after=lambda: 1,
                  methods={"/metrics": {"GET"}, "/v1/info": {"GET"}, "/v1/score": {"POST"}})
    guard.active = 1  # one request held: the limit
    assert asyncio.run(status_of(guard, "POST", "/v1/score")) == 503
    assert asyncio.run(status_of(guard, "GET", "/metrics")) == 200 and asyncio.run(status_of(guard, "GET", "/v1/info")) == 200
    assert metrics.registry.get_sample_value("dfj_rejected_requests_total", {"reason": "busy"}) == 1
