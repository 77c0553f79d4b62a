"""Run time never touches the network, never unpickles, never runs code shipped with a model.

The whole judge life cycle (load base+adapter, judge, export, load the artifact, judge, batch) runs
in a fresh process where every socket connection and DNS lookup, every unpickling and `torch.load`
is recorded and refused, with the Hugging Face offline variables set. A model folder carrying a
planted `auto_map` module proves remote code is not executed.
"""

import json
import os
import shutil
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow

GUARD = r"""
import json, os, pickle, socket, sys
attempts = []

def refuse(what):
    def blocked(*args, **kwargs):
        attempts.append(what)
        raise OSError(f"dfj offline test: {what} is blocked")
    return blocked

socket.socket.connect = refuse("socket.connect")
socket.socket.connect_ex = refuse("socket.connect_ex")
socket.create_connection = refuse("socket.create_connection")
socket.getaddrinfo = refuse("socket.getaddrinfo")
pickle.load = refuse("pickle.load")
pickle.loads = refuse("pickle.loads")
class RefusingUnpickler(pickle.Unpickler):  # a class: libraries subclass pickle.Unpickler at import
    def __init__(self, *args, **kwargs):
        refuse("pickle.Unpickler")()

pickle.Unpickler = RefusingUnpickler
import torch
torch.load = refuse("torch.load")

import dfj
from dfj.batch import judge_jsonl
from dfj.export import merge

adapter, planted, split, work = sys.argv[1:5]
report = {}
try:
    judge = dfj.load_judge(adapter, max_new_tokens=6)
    report["adapter_verdict"] = judge.judge_many(dfj.data.read_split(split).records[:2])[0].to_dict()
    artifact = merge(adapter, os.path.join(work, "artifact"))
    merged = dfj.load_judge(str(artifact), max_new_tokens=6)
    report["batch"] = judge_jsonl(merged, split, os.path.join(work, "out.jsonl")).lines
    report["planted"] = dfj.load_judge(planted, mode="pointwise", max_new_tokens=6).judge_many(dfj.data.read_split(split).records[:1])[0].to_dict()
finally:
    report["attempts"] = attempts
    print("REPORT " + json.dumps(report))
"""

PLANTED_MODULE = """
from pathlib import Path
Path(__file__).with_name("REMOTE_CODE_RAN").write_text("executed")
"""


def test_judge_life_cycle_runs_offline_without_pickles_or_remote_code(tiny, tiny_split, tmp_path):
    import dfj.data  # noqa: F401  (the guard script reaches it as dfj.data)

    planted = tmp_path / "planted-model"
    shutil.copytree(tiny("pointwise"), planted)
    (planted / "dfj.json").unlink(missing_ok=True)  # a plain Hugging Face folder, as downloaded
    (planted / "modeling_evil.py").write_text(PLANTED_MODULE)
    for name in ("config.json", "preprocessor_config.json", "tokenizer_config.json"):
        path = planted / name
        if path.is_file():
            data = json.loads(path.read_text())
            data["auto_map"] = {"AutoConfig": "modeling_evil.Evil", "AutoModel": "modeling_evil.Evil",
                                "AutoProcessor": "modeling_evil.Evil", "AutoImageProcessor": "modeling_evil.Evil",
                                "AutoTokenizer": ["modeling_evil.Evil", None]}
            path.write_text(json.dumps(data))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "HF_HOME": str(tmp_path / "empty-hf-home")}
    proc = subprocess.run(
        [sys.executable, "-c", GUARD, str(tiny("pointwise", adapter=True)), str(planted),
         str(tiny_split("pointwise", 10)), str(tmp_path)],
        env=env, capture_output=True, text=True, timeout=600,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("REPORT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    report = json.loads(lines[-1][len("REPORT "):])
    assert report["attempts"] == []
    assert report["adapter_verdict"]["text"] and report["batch"] == 10
    assert report["planted"]["text"]
    assert not (planted / "REMOTE_CODE_RAN").exists()
