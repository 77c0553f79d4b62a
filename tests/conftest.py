"""Shared fixtures: tiny judges and splits are built once per session, then reused read-only."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach a hub
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """Lazily built tiny judges: tiny('pointwise', adapter=True, adapter_layout='legacy') -> folder."""
    from dfj.tiny import build_tiny_judge

    root = tmp_path_factory.mktemp("tiny")
    built: dict[tuple, Path] = {}

    def get(mode: str = "pointwise", adapter: bool = False, **kwargs) -> Path:
        key = (mode, adapter, tuple(sorted(kwargs.items())))
        if key not in built:
            name = "-".join([mode, "adapter" if adapter else "model"] + [f"{k}={v}" for k, v in sorted(kwargs.items())])
            built[key] = build_tiny_judge(root / name, mode, adapter=adapter, **kwargs)
        return built[key]

    return get


@pytest.fixture(scope="session")
def tiny_split(tmp_path_factory):
    from dfj.tiny import build_tiny_dataset

    root = tmp_path_factory.mktemp("splits")
    built: dict[tuple, Path] = {}

    def get(mode: str = "pointwise", n: int = 10) -> Path:
        if (mode, n) not in built:
            built[(mode, n)] = build_tiny_dataset(root / f"{mode}-{n}", mode, n)
        return built[(mode, n)]

    return get


@pytest.fixture(scope="session")
def merged(tiny, tmp_path_factory):
    """Merged artifacts of the tiny adapters, per mode."""
    from dfj.export import merge

    root = tmp_path_factory.mktemp("merged")
    built: dict[str, Path] = {}

    def get(mode: str = "pointwise") -> Path:
        if mode not in built:
            built[mode] = merge(tiny(mode, adapter=True), root / mode)
        return built[mode]

    return get


@pytest.fixture(scope="session")
def trained_gguf(tmp_path_factory):
    """GGUF artifacts of the trained tiny judges, built once per session: trained_gguf('pairwise', 'q8_0').
    Each mode is exported once (f16, or f32); its K-quants and Q8_0 are quantized from that f16, as
    `dfj export --quant gguf-q8_0` does in one command."""
    from dfj.export import export
    from dfj.quant import quantize
    from dfj.tiny import trained_tiny_judge

    root = tmp_path_factory.mktemp("trained-gguf")
    built: dict[tuple[str, str], Path] = {}

    def get(mode: str, quant: str = "q8_0") -> Path:
        if (mode, quant) not in built:
            if quant in ("f32", "f16"):
                built[mode, quant] = export(trained_tiny_judge(mode), root / f"{mode}-{quant}", f"gguf-{quant}")
            else:
                built[mode, quant] = quantize(get(mode, "f16"), root / f"{mode}-{quant}", f"gguf-{quant}")
        return built[mode, quant]

    return get


@pytest.fixture(scope="module")
def module_dir(tmp_path_factory):
    """module_dir(name) -> a fresh folder removed when the test module is done: exports are large."""
    made: list[Path] = []

    def make(name: str) -> Path:
        made.append(tmp_path_factory.mktemp(name))
        return made[-1]

    yield make
    for path in made:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def judges():
    """Loaded judges, cached per (source, options): loading is the slow part of many tests."""
    import dfj

    cache: dict[tuple, object] = {}

    def get(source, **options):
        key = (str(source), tuple(sorted(options.items())))
        if key not in cache:
            cache[key] = dfj.load_judge(str(source), **options)
        return cache[key]

    return get


def pytest_collection_modifyitems(config, items):
    """`gpu` tests run where torch sees a CUDA device (the lent device machine), and only there."""
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:
        has_cuda = False
    if has_cuda:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device; run on the device machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
