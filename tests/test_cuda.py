"""CUDA half of the torch runtime: same artifacts, bf16 on the GPU, compared with the CPU fp32 path."""

import numpy as np
import pytest

from dfj.data import read_split

pytestmark = [pytest.mark.gpu, pytest.mark.slow]


def test_cuda_bf16_agrees_with_cpu_fp32(merged, judges, tiny_split):
    cpu = judges(merged("pointwise"), max_new_tokens=16)
    gpu = judges(merged("pointwise"), device="cuda", max_new_tokens=16)
    assert gpu.describe()["dtype"] == "torch.bfloat16"
    cont = "<reasoning>The response grounds the label.</reasoning>\n<score>4</score>"
    for record in read_split(tiny_split("pointwise", 10)).records[:3]:
        a = cpu.logprobs(record.image, record.label, record.response, continuation=cont)
        b = gpu.logprobs(record.image, record.label, record.response, continuation=cont)
        kl = (np.exp(a) * (a - b)).sum(-1)
        assert kl.mean() < 0.05, kl
        assert gpu.score(record.image, record.label, record.response).text  # generation runs on CUDA


def test_gptq_artifact_on_cuda_matches_the_cpu_verdicts(tmp_path):
    """The same GPTQ artifact through the stack's CUDA kernels and through the CPU torch kernel."""
    import dfj
    from dfj.pipeline import build
    from dfj.tiny import trained_tiny_judge, trained_tiny_split

    artifact = build(trained_tiny_judge("pointwise"), tmp_path / "gptq", "gptq-4bit",
                      calibration=trained_tiny_split("pointwise", "train"), samples=32)
    records = read_split(trained_tiny_split("pointwise", "test")).records[:10]
    cpu = dfj.load_judge(str(artifact)).score_many(records)
    gpu = dfj.load_judge(str(artifact), device="cuda", dtype="float16").score_many(records)
    same = sum(a.score == b.score for a, b in zip(cpu, gpu))
    print(f"GPTQ CUDA vs CPU: {same}/{len(records)} same scores")
    assert all(v.score is not None for v in gpu) and same >= len(records) - 1


def test_onnx_cuda_provider_matches_cpu(tiny, tmp_path):
    """Runs where onnxruntime-gpu is installed; the plain onnxruntime wheel has no CUDA provider."""
    import onnxruntime

    import dfj
    from dfj.export import export

    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        pytest.skip("onnxruntime without the CUDA execution provider (install onnxruntime-gpu)")
    artifact = export(tiny("pointwise", adapter=True), tmp_path / "onnx", "onnx-fp32")
    from PIL import Image

    image = Image.new("RGB", (112, 84), (30, 60, 90))
    cpu = dfj.load_judge(str(artifact), max_new_tokens=12).score(image, "fake", "a response")
    gpu = dfj.load_judge(str(artifact), device="cuda", max_new_tokens=12).score(image, "fake", "a response")
    assert cpu.text == gpu.text
