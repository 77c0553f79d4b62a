"""ONNX int8 / int4 weight quantization of the decoder graph (onnxruntime's own quantizers), from an
onnx-fp32 artifact; the vision and embedding graphs stay fp32. Parity is measured against the fp32
input through ONNX Runtime on the export probe.
"""

from __future__ import annotations

import contextlib
import dataclasses
import shutil
from pathlib import Path
from typing import Any

from dfj.artifact.onnx_files import save_graph
from dfj.artifact.probe import onnx_probe_logits
from dfj.layout import ONNX_GRAPH_FILES
from dfj.artifact.probe import compare_logits
from dfj.artifact.staging import staged_folder
from dfj.manifest import write_manifest
from dfj.quant import QuantSpec, quantized_manifest

INT4_BLOCK_SIZE = 32


def quantize_graphs(folder: Path, quant: str, external: bool | None = None) -> dict[str, Any]:
    """Weight-quantize the decoder's MatMuls (head included) in place; vision and embedding stay fp32."""
    import tempfile

    import onnx

    if quant not in ("int8", "int4"):
        raise ValueError(f"unknown ONNX weight quantization {quant!r}: int8 or int4")
    decoder = folder / ONNX_GRAPH_FILES["decoder"]
    with _quiet_quantizer(), tempfile.TemporaryDirectory(dir=folder, prefix=".quant-") as scratch:
        quantized = Path(scratch) / ONNX_GRAPH_FILES["decoder"]
        if quant == "int8":
            from onnxruntime.quantization import QuantType, quantize_dynamic

            quantize_dynamic(str(decoder), str(quantized), weight_type=QuantType.QInt8, per_channel=True,
                             op_types_to_quantize=["MatMul", "Gemm"], use_external_data_format=True)
            info = {"method": "onnxruntime dynamic quantization", "weight_type": "int8", "per_channel": True,
                    "ops": ["MatMul", "Gemm"]}
            model = onnx.load(str(quantized))
        else:
            from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

            config = DefaultWeightOnlyQuantConfig(block_size=INT4_BLOCK_SIZE, is_symmetric=True, bits=4)
            quantizer = MatMulNBitsQuantizer(onnx.load(str(decoder)), algo_config=config)
            quantizer.process()
            model = quantizer.model.model
            info = {"method": "MatMulNBits weight-only", "bits": 4, "block_size": INT4_BLOCK_SIZE, "symmetric": True}
        save_graph(model, decoder, external)
    return info


@contextlib.contextmanager
def _quiet_quantizer():
    """onnxruntime's quantizers log every node at INFO, some on the root logger."""
    import logging

    loggers = [logging.getLogger(), logging.getLogger("onnxruntime"), logging.getLogger("onnxruntime.quantization"),
               logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def quantize_onnx(source: Path, out: Path, spec: QuantSpec, manifest, *, overwrite: bool = False) -> Path:
    with staged_folder(out, overwrite=overwrite) as work:
        # onnx.json: the graphs' layout in artifacts made before it moved into dfj.json's `extra.onnx` alone.
        shutil.copytree(source, work, dirs_exist_ok=True, ignore=shutil.ignore_patterns("dfj.json", "onnx.json"))
        onnx_info = dict(manifest.extra.get("onnx", {}))
        onnx_info["quantization"] = quantize_graphs(work, spec.level)
        layout = dataclasses.replace(manifest, extra={**manifest.extra, "onnx": onnx_info})
        parity = compare_logits(onnx_probe_logits(source, manifest), onnx_probe_logits(work, layout))
        parity.update(reference="onnx-fp32 (input, ONNX Runtime)", tolerance=None)
        write_manifest(work, quantized_manifest(manifest, source, "onnx", spec.method, parity, {"onnx": onnx_info}))
    return Path(out).resolve()
