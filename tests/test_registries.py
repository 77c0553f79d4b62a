"""The registries: every runtime in RUNTIMES loads and judges through the six-method contract, every
exporter and quantizer entry resolves, and exporters reach runtimes only through the contract."""

import ast
import inspect
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import dfj

ROOT = Path(dfj.__file__).parent
CONTRACT = {"load", "tokenize", "decode", "generate", "score", "embed_images"}


def test_the_runtime_contract_is_six_methods():
    from dfj.runtime.base import Runtime

    assert Runtime.__abstractmethods__ == CONTRACT


@pytest.fixture(scope="module")
def artifacts(tiny, module_dir):
    """A tiny merged judge in each format a runtime runs (ONNX and GGUF exported from it)."""
    from dfj.export import export

    root = module_dir("registries")
    merged = export(tiny("pairwise", adapter=True), root / "merged", "none")
    return {"safetensors": merged, "onnx": export(merged, root / "onnx", "onnx-fp32"),
            "gguf": export(merged, root / "gguf", "gguf-f32")}


def test_every_runtime_loads_and_judges_through_the_contract(artifacts):
    from dfj.runtime import RUNTIME_FOR_FORMAT, RUNTIMES, Runtime, runtime_class

    image = Image.new("RGB", (56, 84), (120, 30, 200))
    verdicts, embeddings = {}, {}
    for name in RUNTIMES:
        cls = runtime_class(name)
        assert issubclass(cls, Runtime) and not cls.__abstractmethods__, name
        formats = [f for f, runtime in RUNTIME_FOR_FORMAT.items() if runtime == name and f in artifacts]
        assert formats, f"no artifact format runs on {name}"
        judge = dfj.load_judge(str(artifacts[formats[0]]), runtime=name)
        assert type(judge.runtime) is cls
        verdicts[name] = judge.compare(image, "fake", "a response", "another response")
        [embeddings[name]] = judge.runtime.embed_images([judge.prompt(image, "fake", "a", "b")])
        judge.runtime.close()
    assert {name for name, v in verdicts.items() if v.p_a is not None} == set(RUNTIMES)
    choices = {v.choice for v in verdicts.values()}
    assert len(choices) == 1, verdicts  # fp32 everywhere: one verdict
    reference = embeddings["torch"]
    for name, rows in embeddings.items():  # the image as every runtime feeds it to the language model
        assert rows.dtype == np.float32 and rows.shape == reference.shape, (name, rows.shape, reference.shape)
        assert np.abs(rows - reference).max() <= 1e-3 * np.abs(reference).max(), name


def test_every_runtime_stops_generating_once_cancelled(artifacts):
    from dfj.runtime import RUNTIME_FOR_FORMAT, RUNTIMES
    from dfj.runtime.base import Cancelled

    image = Image.new("RGB", (56, 84), (120, 30, 200))
    for name in RUNTIMES:
        fmt = next(f for f, runtime in RUNTIME_FOR_FORMAT.items() if runtime == name and f in artifacts)
        judge = dfj.load_judge(str(artifacts[fmt]), runtime=name)
        prompts = [judge.prepare({"image": image, "label": "fake", "response_a": a, "response_b": "b"}).prompt
                   for a in ("one", "two")]
        polls: list[int] = []

        def cancel() -> bool:
            polls.append(1)
            return len(polls) > 3

        results = judge.runtime.generate(prompts, 40, cancel=cancel)
        assert all(isinstance(r, Cancelled) for r in results), (name, results)
        assert len(polls) <= 4 + len(prompts), (name, len(polls))  # stopped at once, nothing rerun
        finished = judge.runtime.generate(prompts[:1], 3, cancel=lambda: False)
        assert isinstance(finished[0], list) and len(finished[0]) <= 3, (name, finished)
        judge.runtime.close()


def test_every_runtime_refuses_options_it_does_not_have(artifacts):
    for path in artifacts.values():
        with pytest.raises(ValueError, match="unknown .* options: colour"):
            dfj.load_judge(str(path), colour="blue")


def test_every_export_format_and_quant_family_resolves_to_a_function_taking_source_and_out():
    import importlib

    from dfj.export import FORMATS
    from dfj.quant import FAMILIES

    targets = [target for target, _ in FORMATS.values()] + [family.module for family in FAMILIES.values()]
    for target in targets:
        module, attr = target.split(":")
        function = getattr(importlib.import_module(module), attr)
        assert list(inspect.signature(function).parameters)[:2] == ["source", "out"], target


def test_exporters_and_quantizers_reach_runtimes_only_through_the_contract():
    """No exporter names a runtime class or calls a runtime method that is not on the contract."""
    for path in sorted((ROOT / "export").glob("*.py")) + sorted((ROOT / "quant").glob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("dfj.runtime."):
                names = {alias.name for alias in node.names}
                assert not any(n.endswith("Runtime") for n in names), (path.name, names)
        source = path.read_text(encoding="utf-8")
        for method in ("prompt_logits", "from_folder", "generate_ids", "logprobs_ids", "image_embeddings", "embed_images"):
            assert f".{method}(" not in source, (path.name, method)


def test_an_export_of_a_dfj_artifact_records_it_and_continues_its_chain(artifacts):
    from dfj.manifest import MANIFEST_NAME, read_manifest, sha256_file

    merged = read_manifest(artifacts["safetensors"])
    for fmt in ("onnx", "gguf"):
        exported = read_manifest(artifacts[fmt])
        assert exported.source["manifest_sha256"] == sha256_file(artifacts["safetensors"] / MANIFEST_NAME)
        assert [stage["stage"] for stage in exported.chain] == ["export", "export"]
        assert exported.chain[0] == merged.chain[0] and exported.chain[1]["format"] == fmt
