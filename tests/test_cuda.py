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
