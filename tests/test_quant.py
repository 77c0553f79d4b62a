"""`dfj quant` as its own stage: it reads the lossless artifact its method needs (and says what that is
otherwise), never exports again, records parity against its input and the chain of stages, and the
`dfj export --quant M` shortcut writes the same model files as export then quant."""

import pytest
from typer.testing import CliRunner

from dfj.cli import app
from dfj.export import export
from dfj.pipeline import build
from dfj.manifest import ArtifactError, read_manifest, sha256_file, verify
from dfj.quant import QuantSpec, quantize

pytestmark = pytest.mark.slow

runner = CliRunner()


@pytest.fixture(scope="module")
def lossless(tiny, module_dir):
    root = module_dir("quant-inputs")
    adapter = tiny("pointwise", adapter=True)
    return {quant: export(adapter, root / quant, quant) for quant in ("none", "gguf-f16", "onnx-fp32")}


def _no_export(monkeypatch):
    """Any export or merge during quantization fails the test."""
    import dfj.export.gguf as gguf_export
    import dfj.export.lora_merge as lora_merge
    import dfj.export.onnx as onnx_export

    def refuse(*args, **kwargs):
        raise AssertionError("quantization ran an export")

    for module, name in ((lora_merge, "export_merged"), (lora_merge, "stream_merge"), (gguf_export, "export_gguf"),
                         (gguf_export, "write_gguf"), (onnx_export, "export_onnx"), (onnx_export, "export_graphs")):
        monkeypatch.setattr(module, name, refuse)


def test_every_gguf_method_quantizes_the_f16_artifact_without_exporting_again(lossless, tmp_path, monkeypatch):
    _no_export(monkeypatch)
    sizes, cosines = {}, {}
    for method in ("gguf-q4_k_m", "gguf-q5_k_m", "gguf-q6_k", "gguf-q8_0"):
        result = runner.invoke(app, ["quant", str(lossless["gguf-f16"]), "-o", str(tmp_path / method), "--method", method])
        assert result.exit_code == 0, result.output
        manifest = verify(tmp_path / method)
        assert manifest.format == "gguf" and manifest.quant == method and manifest.extra["gguf"]["quant"] == method[5:]
        assert manifest.parity["reference"] == "gguf-f16 (input, llama.cpp)"
        cosines[method] = manifest.parity["cosine"]
        assert sha256_file(tmp_path / method / "mmproj.gguf") == sha256_file(lossless["gguf-f16"] / "mmproj.gguf")
        sizes[method] = (tmp_path / method / "model.gguf").stat().st_size
    assert sizes["gguf-q4_k_m"] < sizes["gguf-q5_k_m"] < sizes["gguf-q6_k"] < sizes["gguf-q8_0"]
    # The random tiny judge is fragile (q4_k_m: cosine 0.88); more bits must stay closer to the input.
    assert cosines["gguf-q4_k_m"] < cosines["gguf-q6_k"] < cosines["gguf-q8_0"] and cosines["gguf-q8_0"] > 0.99, cosines


def test_the_manifest_keeps_the_chain_from_source_to_quantization(lossless, tmp_path):
    out = quantize(lossless["onnx-fp32"], tmp_path / "int8", "onnx-int8")
    manifest, parent = read_manifest(out), read_manifest(lossless["onnx-fp32"])
    assert [link["stage"] for link in manifest.chain] == ["export", "quant"]
    assert [link["quant"] for link in manifest.chain] == ["onnx-fp32", "onnx-int8"]
    assert manifest.chain[0] == parent.chain[0] and manifest.chain[0]["parity"] == parent.parity  # the export's check vs transformers
    assert manifest.source["manifest_sha256"] == sha256_file(lossless["onnx-fp32"] / "dfj.json")
    assert manifest.source["origin"] == parent.source and manifest.mode == parent.mode and manifest.pixels == parent.pixels
    # int8 probe cosine on the random tiny judge: 0.99+ on the AVX-512/AMX Xeon, 0.9892 on an AVX2-only EPYC
    # (onnxruntime's int8 kernels differ without VNNI); a wrongly scaled or mapped graph falls far below.
    assert manifest.parity["reference"] == "onnx-fp32 (input, ONNX Runtime)" and 0.98 < manifest.parity["cosine"] < 1.0
    assert manifest.extra["onnx"]["quantization"]["weight_type"] == "int8"
    assert manifest.chain[-1]["parity"] == manifest.parity and not (out / "onnx.json").exists()


@pytest.mark.parametrize("method", ["gguf-q4_k_m", "onnx-int4"])
def test_the_export_shortcut_writes_the_same_model_files_as_export_then_quant(tiny, lossless, tmp_path, method):
    staged = quantize(lossless["gguf-f16" if method.startswith("gguf") else "onnx-fp32"], tmp_path / "staged", method)
    shortcut = build(tiny("pointwise", adapter=True), tmp_path / "shortcut", method)
    files, again = read_manifest(staged).files, read_manifest(shortcut).files
    assert files == again and len(files) >= 2
    assert [link["quant"] for link in read_manifest(shortcut).chain] == [read_manifest(staged).chain[0]["quant"], method]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # the intermediate export is gone


@pytest.mark.parametrize("method, given, needs", [
    ("gguf-q4_k_m", "none", "gguf-q4_k_m quantizes a gguf-f32 / gguf-f16 artifact"),
    ("onnx-int8", "gguf-f16", "onnx-int8 quantizes a onnx-fp32 artifact"),
    ("gptq-4bit", "onnx-fp32", "gptq-4bit quantizes a none artifact"),
])
def test_a_method_given_the_wrong_artifact_says_what_it_needs(lossless, tmp_path, method, given, needs):
    result = runner.invoke(app, ["quant", str(lossless[given]), "-o", str(tmp_path / "out"), "--method", method])
    assert result.exit_code == 2 and needs in result.output and "dfj export SOURCE --quant" in result.output
    assert not (tmp_path / "out").exists()


def test_quant_refuses_unknown_methods_stray_options_and_non_artifacts(tiny, lossless, tmp_path):
    with pytest.raises(ValueError, match="unknown quantization method 'gguf-q3_k'"):
        quantize(lossless["gguf-f16"], tmp_path / "o", "gguf-q3_k")
    with pytest.raises(ValueError, match="gguf-q8_0 takes no calibration"):
        QuantSpec("gguf-q8_0", calibration=tmp_path)
    with pytest.raises(ArtifactError, match="not a dfj artifact"):
        quantize(tmp_path, tmp_path / "o", "gguf-q8_0")
    with pytest.raises(ValueError, match="dtype applies to --quant none, not gguf-f16"):
        export(tiny("pointwise", adapter=True), tmp_path / "o", "gguf-f16", dtype="float32")
    result = runner.invoke(app, ["quant", str(lossless["gguf-f16"]), "-o", str(tmp_path / "o"), "--method", "gptq-4bit"])
    assert result.exit_code == 2 and "quantizes a none artifact" in result.output
