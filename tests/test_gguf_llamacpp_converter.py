"""dfj's GGUF export against llama.cpp's own converter (`convert_hf_to_gguf.py`, from the llama-cpp-python
source package that scripts/install.sh keeps in the wheel cache): same tensors, same metadata outside
`general.*`, and a file llama.cpp loads without vocabulary warnings."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from llama_source import unpack

pytest.importorskip("gguf")
pytestmark = pytest.mark.slow

@pytest.fixture(scope="module")
def converter(tmp_path_factory) -> Path:
    """llama.cpp's converter, its conversion package and its gguf-py, unpacked from the source package."""
    return unpack(tmp_path_factory.mktemp("llama-converter"), ("convert_hf_to_gguf.py", "conversion/", "gguf-py/"))


@pytest.fixture(scope="module")
def converted(converter, merged, module_dir):
    """(dfj's export, llama.cpp's conversion) of one merged tiny judge: text and vision files."""
    from dfj.export import export
    from dfj.export.gguf import GGUF_MMPROJ_FILE, GGUF_TEXT_FILE

    model = merged("pointwise")
    ours = export(model, module_dir("dfj-gguf") / "f32", "gguf-f32")
    theirs = module_dir("llama-gguf")
    for flag, name in (([], GGUF_TEXT_FILE), (["--mmproj"], GGUF_MMPROJ_FILE)):
        run = subprocess.run([sys.executable, str(converter / "convert_hf_to_gguf.py"), str(model), "--outtype", "f32",
                              "--outfile", str(theirs / name), *flag], capture_output=True, text=True, timeout=600)
        assert run.returncode == 0, run.stderr[-3000:]
    return ours, theirs


def _read(path: Path) -> tuple[dict, dict]:
    from gguf import GGUFReader

    reader = GGUFReader(path)
    metadata = {}
    for field in reader.fields.values():
        if field.name.startswith("GGUF."):  # the header (version, counts), not metadata
            continue
        value = field.contents()
        metadata[field.name] = value
    tensors = {t.name: (t.tensor_type.name, tuple(int(n) for n in t.shape), np.array(t.data)) for t in reader.tensors}
    return metadata, tensors


@pytest.mark.parametrize("file", ["text", "mmproj"])
def test_dfj_gguf_has_the_tensors_and_metadata_llama_cpp_converter_writes(converted, file):
    from dfj.export.gguf import GGUF_MMPROJ_FILE, GGUF_TEXT_FILE

    name = GGUF_TEXT_FILE if file == "text" else GGUF_MMPROJ_FILE
    ours, theirs = converted
    our_meta, our_tensors = _read(ours / name)
    their_meta, their_tensors = _read(theirs / name)
    assert sorted(our_tensors) == sorted(their_tensors)
    for key, (kind, shape, data) in their_tensors.items():
        assert our_tensors[key][:2] == (kind, shape), key
        assert np.array_equal(our_tensors[key][2], data), f"{key}: tensor data differ"
    outside_general = lambda meta: {k: v for k, v in meta.items() if not k.startswith("general.")}  # noqa: E731
    ours_only, theirs_only = outside_general(our_meta), outside_general(their_meta)
    assert sorted(ours_only) == sorted(theirs_only)
    differing = [k for k in theirs_only if ours_only[k] != theirs_only[k]]
    assert not differing, {k: (str(ours_only[k])[:200], str(theirs_only[k])[:200]) for k in differing}
    assert our_meta["general.type"] == their_meta["general.type"]


def _load_log(path: Path) -> str:
    script = "import sys, llama_cpp; llama_cpp.Llama(model_path=sys.argv[1], vocab_only=True, verbose=True)"
    run = subprocess.run([sys.executable, "-c", script, str(path)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    log = run.stdout + run.stderr
    assert "tokenizer.ggml.token_type" in log  # the log was captured (the loader lists the file's keys)
    return log


def test_llama_cpp_warns_about_no_token_of_the_dfj_gguf_its_own_conversion_does_not_warn_about(converted):
    """Typed USER_DEFINED, Qwen2.5's six added <|fim_…|> tokens drew a "control-looking token" warning
    each. What remains is the vocabulary's own `</s>` (id 128247, an ordinary BPE token), which llama.cpp
    also warns about in the file its converter writes."""
    from dfj.export.gguf import GGUF_TEXT_FILE

    ours, theirs = converted
    warned = lambda log: [line for line in log.splitlines() if "control-looking token" in line]  # noqa: E731
    assert warned(_load_log(ours / GGUF_TEXT_FILE)) == warned(_load_log(theirs / GGUF_TEXT_FILE))
    assert all("'</s>'" in line for line in warned(_load_log(ours / GGUF_TEXT_FILE)))
