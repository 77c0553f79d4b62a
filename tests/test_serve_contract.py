"""`dfj serve`'s contract for clients in any language: its OpenAPI document describes every request
body, response and error; a property-based API fuzzer (schemathesis, every check but positive-data
acceptance) finds nothing against a live service of each mode, which still serves after it; a client
generated from the document (openapi-python-client) makes a scoring call; a wrong method is 405; an
oversized body is a 413 the client reads after writing its whole body."""

from __future__ import annotations

import base64
import io
import json
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
httpx = pytest.importorskip("httpx", reason="the test extra installs httpx")

from serving import KEY, Service  # noqa: E402

BIN = Path(sys.executable).parent


def _png() -> str:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (56, 56), (180, 40, 40)).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


@pytest.fixture(scope="module")
def pairwise(merged, module_dir):
    with Service(merged("pairwise"), module_dir("contract-pairwise"), "--max-body-mb", "2") as service:
        yield service


@pytest.fixture(scope="module")
def pointwise(merged, module_dir):
    folder = module_dir("contract-pointwise")
    (folder / "root").mkdir()
    with Service(merged("pointwise"), folder, "--image-root", str(folder / "root"), key=KEY) as service:
        yield service


def test_the_document_describes_every_route_body_answer_and_error(pairwise, pointwise):
    document = httpx.get(pairwise.url + "/openapi.json", timeout=120).json()  # open, like /health
    assert document["openapi"].startswith("3.1") and set(document["paths"]) == {
        "/health", "/v1/info", "/metrics", "/v1/compare", "/v1/compare/batch", "/v1/chat/completions"}
    compare = document["paths"]["/v1/compare"]["post"]
    assert compare["requestBody"]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/CompareRequest"}
    assert {"200", "400", "413", "415", "421", "422", "500", "503", "504"} <= set(compare["responses"])
    schemas = document["components"]["schemas"]
    assert schemas["CompareRequest"]["properties"]["label"]["enum"] == ["real", "fake", "edited"]
    assert "image_path" not in schemas["CompareRequest"]["properties"]  # started without --image-root
    assert set(schemas["Error"]["properties"]) == {"error"} and "securitySchemes" not in document["components"]
    keyed = httpx.get(pointwise.url + "/openapi.json", timeout=120).json()
    assert keyed["components"]["securitySchemes"] == {"bearer": {"type": "http", "scheme": "bearer"}}
    assert "image_path" in keyed["components"]["schemas"]["ScoreRequest"]["properties"]
    assert "401" in keyed["paths"]["/v1/score"]["post"]["responses"]


@pytest.mark.parametrize("mode", ["pairwise", "pointwise"])
def test_a_property_based_fuzzer_finds_nothing_and_the_service_goes_on(mode, pairwise, pointwise, tmp_path):
    service = pairwise if mode == "pairwise" else pointwise
    auth = ["-H", f"Authorization: Bearer {KEY}"] if service.key else []
    # Every check, but accepting every schema-valid request: no schema can say which bytes decode as an image.
    fuzz = subprocess.run([str(BIN / "schemathesis"), "run", service.url + "/openapi.json", *auth, "--checks", "all",
                           "--exclude-checks", "positive_data_acceptance", "--max-examples", "60",
                           "--generation-deterministic", "--workers", "1", "--request-timeout", "120"],
                          capture_output=True, text=True, timeout=1200, cwd=tmp_path)  # its .schemathesis/ goes there
    assert fuzz.returncode == 0, fuzz.stdout[-6000:]
    assert "passed" in fuzz.stdout and "failed" not in fuzz.stdout.split("SUMMARY")[-1]
    assert service.client.get("/health").status_code == 200 and service.proc.poll() is None


def test_a_generated_client_makes_a_scoring_call(pairwise, tmp_path):
    (tmp_path / "openapi.json").write_text(httpx.get(pairwise.url + "/openapi.json", timeout=120).text)
    generated = subprocess.run([str(BIN / "openapi-python-client"), "generate", "--path", str(tmp_path / "openapi.json"),
                                "--output-path", str(tmp_path / "client")], capture_output=True, text=True, timeout=300)
    assert (tmp_path / "client" / "dfj_judge_service_client").is_dir(), generated.stdout + generated.stderr
    call = f"""
import json
from dfj_judge_service_client import Client
from dfj_judge_service_client.api.default import compare
from dfj_judge_service_client.models import CompareRequest, CompareRequestLabel, PairwiseVerdict
verdict = compare.sync(client=Client(base_url={pairwise.url!r}, timeout=120),
                       body=CompareRequest(image={_png()!r}, label=CompareRequestLabel.FAKE, response_a="The jawline is blurred.",
                                           response_b="It is real."))
assert isinstance(verdict, PairwiseVerdict), verdict
print(json.dumps(verdict.to_dict()))
"""
    done = subprocess.run([sys.executable, "-c", call], cwd=tmp_path / "client", capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    verdict = json.loads(done.stdout)
    # An untrained judge: a verdict, or the reason there is none, both in the documented shape.
    assert verdict["text"].startswith("<answer>") and 0 <= verdict["p_a"] <= 1, verdict
    assert (verdict["choice"] in ("A", "B")) != bool(verdict.get("error")), verdict
    assert verdict["provenance"]["run_id"].startswith("sha256:")
    shutil.rmtree(tmp_path / "client")


def test_a_wrong_method_is_405_naming_the_allowed_ones(pairwise):
    answer = pairwise.client.post("/health", json={})
    assert answer.status_code == 405 and answer.headers["allow"] == "GET" and answer.json()["error"]["code"] == 405
    answer = pairwise.client.get("/v1/compare")
    assert answer.status_code == 405 and answer.headers["allow"] == "POST"
    assert pairwise.client.get("/nowhere").status_code == 404


def test_an_oversized_body_is_a_413_a_client_writing_it_whole_can_read(pairwise):
    """urllib writes the whole body before it reads: a close while it writes would be a broken pipe."""
    body = json.dumps({"image": "A" * (3 << 20), "label": "fake", "response_a": "a", "response_b": "b"}).encode()
    request = urllib.request.Request(pairwise.url + "/v1/compare", data=body, method="POST",
                                     headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=60)
    assert refused.value.code == 413 and "over this service's limit of 2 MB" in json.loads(refused.value.read())["error"]["message"]
    assert pairwise.client.get("/health").status_code == 200
