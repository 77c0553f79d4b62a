"""The llama.cpp inside the llama-cpp-python source package that scripts/install.sh keeps in the wheel
cache: the tests unpack the parts they need from it (the converter, the headers)."""

from __future__ import annotations

import os
import tarfile
from pathlib import Path

LLAMA_CPP_VERSION = "0.3.36"  # scripts/install.sh's
PREFIX = f"llama_cpp_python-{LLAMA_CPP_VERSION}/vendor/llama.cpp/"


def unpack(root: Path, wanted: tuple[str, ...], suffix: str = "") -> Path:
    """The source package's members under `PREFIX + w` for each of `wanted` (ending in `suffix`), unpacked
    into `root`; returns the llama.cpp folder there."""
    wheels = Path(os.environ.get("DFJ_WHEEL_CACHE") or Path.home() / ".cache" / "dfj" / "wheels")
    sdist = wheels / f"llama_cpp_python-{LLAMA_CPP_VERSION}.tar.gz"
    assert sdist.is_file(), f"{sdist} is missing: scripts/install.sh fetches it"
    starts = tuple(PREFIX + w for w in wanted)
    with tarfile.open(sdist) as archive:
        members = [m for m in archive.getmembers() if m.name.startswith(starts) and m.name.endswith(suffix)]
        archive.extractall(root, members=members, filter="data")
    return root / PREFIX
