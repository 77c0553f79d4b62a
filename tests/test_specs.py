"""Typed specifications: runtime options and quantization specs are dataclasses with Literal choices,
importable without torch; an unknown option or a bad value is an error that names it."""

from __future__ import annotations

import subprocess
import sys

import pytest


def test_the_specifications_import_without_torch():
    code = ("import sys; import dfj.runtime.options, dfj.quant, dfj.tolerances, dfj.export, dfj.export.spec, dfj.judge; "
            "print(sorted(m for m in ('torch', 'transformers', 'onnxruntime', 'llama_cpp') if m in sys.modules))")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "[]"


def test_an_unknown_runtime_option_is_named_with_the_ones_it_takes():
    from dfj.runtime.options import LlamaCppOptions, RuntimeOptions

    with pytest.raises(ValueError, match=r"unknown torch runtime options: colour, size \(it takes limits\)"):
        RuntimeOptions.parse("torch", {"colour": "blue", "size": 3})
    with pytest.raises(ValueError, match="it takes limits, context, threads, normalizer"):
        LlamaCppOptions.parse("llama.cpp", {"ctx": 4096})
    assert LlamaCppOptions.parse("llama.cpp", {"context": 4096}).context == 4096


@pytest.mark.parametrize("given, message", [
    ({"context": 0}, "context must be a positive integer"),
    ({"threads": "4"}, "threads must be a positive integer"),
    ({"normalizer": "NFX"}, "normalizer must be one of manifest, NFC"),
    ({"limits": (3136, 1003520)}, "limits must be a dfj.images.PixelLimits"),
])
def test_a_bad_runtime_option_value_is_refused(given, message):
    from dfj.runtime.options import LlamaCppOptions

    with pytest.raises(ValueError, match=message):
        LlamaCppOptions.parse("llama.cpp", given)


def test_a_quantization_spec_refuses_unknown_methods_and_misplaced_calibration(tmp_path):
    from dfj.quant import QuantSpec

    with pytest.raises(ValueError, match="unknown quantization method 'gguf-q3_k'"):
        QuantSpec("gguf-q3_k")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="gguf-q8_0 takes no calibration"):
        QuantSpec("gguf-q8_0", calibration=tmp_path)
    assert QuantSpec("gptq-4bit", calibration=tmp_path).level == "4bit"


@pytest.mark.parametrize("fmt, options, message", [
    ("none", {"colour": "blue"}, r"unknown export option colour \(--quant none takes mode, limits, dtype, check, probe_memory\)"),
    ("gguf-f16", {"dtype": "float32"}, "dtype applies to --quant none, not gguf-f16"),
    ("onnx-fp32", {"mmproj_dtype": "f16"}, "mmproj_dtype applies to --quant gguf-f32 / gguf-f16, not onnx-fp32"),
    ("none", {"dtype": "fp64"}, "dtype must be one of auto, float32, bfloat16, float16, not 'fp64'"),
    ("gguf-f32", {"mmproj_dtype": "q8"}, "mmproj_dtype must be one of f32, f16"),
    ("onnx-fp32", {"external_data": "yes"}, "external_data must be true or false"),
    ("none", {"probe_memory": -1}, "probe_memory must be a number of bytes >= 0"),
    ("none", {"mode": "listwise"}, "mode must be one of pointwise, pairwise"),
    ("gguf-q4", {}, "format must be one of none, onnx-fp32, gguf-f32, gguf-f16"),
])
def test_an_export_spec_names_an_unknown_misplaced_or_bad_option(fmt, options, message):
    from dfj.export import ExportSpec

    with pytest.raises(ValueError, match=message):
        ExportSpec.parse(fmt, options)


def test_an_export_spec_passes_only_the_options_given_to_its_exporter():
    from dfj.export import ExportSpec
    from dfj.images import PixelLimits

    limits = PixelLimits(3136, 200704)
    assert ExportSpec.parse("gguf-f32", {"mmproj_dtype": "f32", "probe_memory": 0, "limits": limits}).exporter_options() == {
        "limits": limits, "mmproj_dtype": "f32", "probe_memory": 0}
    assert ExportSpec.parse("none", {"mode": None, "dtype": "bfloat16"}).exporter_options() == {"dtype": "bfloat16"}
