"""Where the trained tiny judges are kept: one build per CPU class, so a known class never retrains."""

import json

from dfj.tiny.cache import _adopt_unkeyed
from dfj.tiny.training import TrainingClock, TrainSettings, cpu_class


def test_the_cpu_class_names_the_kernels_and_the_bf16_units(monkeypatch):
    aten, _, units = cpu_class().partition("-")
    assert aten in ("default", "avx2", "avx512", "avx512_vnni", "avx512_bf16", "amx", "zvector", "vsx") and units in ("amx", "bf16", "fp32")
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")  # oneDNN capped below native bf16: the head trains in fp32
    assert cpu_class().endswith("-fp32")


def test_a_build_from_before_classed_folders_is_adopted_only_by_its_own_class(tmp_path):
    legacy = tmp_path / "trained-v11-seed0"
    legacy.mkdir()
    (legacy / "metrics.json").write_text(json.dumps({"machine": {"aten_cpu_capability": "AVX512", "head_dtype": "bfloat16"}}))
    assert not _adopt_unkeyed(tmp_path / "trained-v11-seed0-avx2-fp32", legacy, "avx2-fp32")
    assert not _adopt_unkeyed(tmp_path / "trained-v11-seed0-avx512-fp32", legacy, "avx512-fp32")
    assert legacy.is_dir()
    assert _adopt_unkeyed(tmp_path / "trained-v11-seed0-avx512-amx", legacy, "avx512-amx")
    assert not legacy.exists() and (tmp_path / "trained-v11-seed0-avx512-amx" / "metrics.json").is_file()
    assert not _adopt_unkeyed(tmp_path / "x", tmp_path / "missing", "avx512-amx")


def test_the_first_builds_time_left_follows_the_work_done(monkeypatch):
    import dfj.tiny.training as training

    now = [0.0]
    monkeypatch.setattr(training.time, "perf_counter", lambda: now[0])
    clock = TrainingClock(TrainSettings())
    assert clock.left() == ""  # nothing measured yet: no guess
    now[0] = 100.0
    clock.advance(100)  # a tenth of the base phase in 100 s
    total = 1000 + 1.5 * (450 + 500) + 290
    assert clock.left() == f"; about {round((total - 100) / 60)} min left"
    clock.advance(total - 100 - 10)
    assert clock.left() == "; under a minute left"
