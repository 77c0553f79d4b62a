"""The bench's arithmetic and gate, by hand: KL statistics, tolerance parsing, gate verdicts."""

import math

import numpy as np
import pytest

from dfj.bench.parity import ReferenceRows, summarize, token_parity
from dfj.bench.entries import ArtifactEntry, Cost, gate
from dfj.bench.run import DEFAULT_TOLERANCE, _describe, parse_tolerance, published_for


def _log_softmax(x):
    x = np.asarray(x, dtype=np.float64)
    return (x - np.log(np.exp(x - x.max(axis=1, keepdims=True)).sum(axis=1, keepdims=True)) - x.max(axis=1, keepdims=True)).astype(np.float32)


def test_kl_is_exact_when_top_k_covers_the_vocabulary():
    ref = _log_softmax([[2.0, 1.0, 0.0, -1.0], [0.0, 3.0, 0.5, 0.1]])
    art = _log_softmax([[1.5, 1.2, 0.1, -1.0], [0.2, 2.0, 0.5, 0.3]])
    tokens = [0, 1]
    rows = ReferenceRows.from_logprobs(ref, tokens, k=4)
    parity = token_parity(rows, art, tokens)
    p, q = np.exp(ref.astype(np.float64)), np.exp(art.astype(np.float64))
    expected = (p * (np.log(p) - np.log(q))).sum(axis=1)
    assert parity.kl == pytest.approx(expected.tolist(), rel=1e-5)
    assert parity.delta_p == pytest.approx([q[0, 0] - p[0, 0], q[1, 1] - p[1, 1]], rel=1e-5)
    assert parity.top1 == [True, True]


def test_top_k_kl_is_the_coarsened_kl_and_never_exceeds_the_full_one():
    rng = np.random.default_rng(0)
    ref = _log_softmax(rng.normal(size=(5, 50)) * 3)
    art = _log_softmax(ref + rng.normal(size=(5, 50)) * 0.3)
    tokens = ref.argmax(axis=1).tolist()
    full = token_parity(ReferenceRows.from_logprobs(ref, tokens, k=50), art, tokens).kl
    top = token_parity(ReferenceRows.from_logprobs(ref, tokens, k=5), art, tokens).kl
    assert all(0 <= t <= f + 1e-9 for t, f in zip(top, full))
    # by hand for row 0: five buckets plus the rest
    rows = ReferenceRows.from_logprobs(ref, tokens, k=5)
    p = np.exp(rows.logprobs[0].astype(np.float64))
    q = np.exp(art[0, rows.ids[0]].astype(np.float64))
    by_hand = (p * np.log(p / q)).sum() + (1 - p.sum()) * math.log((1 - p.sum()) / (1 - q.sum()))
    assert top[0] == pytest.approx(by_hand, rel=1e-4)


def test_identical_distributions_agree_fully_and_tokenizer_mismatch_is_an_error():
    ref = _log_softmax(np.random.default_rng(1).normal(size=(3, 20)))
    rows = ReferenceRows.from_logprobs(ref, [1, 2, 3], k=8)
    same = token_parity(rows, ref, [1, 2, 3])
    assert max(same.kl) < 1e-6 and max(map(abs, same.delta_p)) < 1e-6 and all(same.top1)
    summary = summarize([same, same])
    assert summary.tokens == 6 and summary.top1_agreement == 1.0 and summary.kld_max < 1e-6
    assert summarize([]).kld_mean is None
    with pytest.raises(ValueError, match="tokenizers differ"):
        token_parity(rows, ref[:2], [1, 2])


def test_reference_rows_round_trip_without_pickle(tmp_path):
    ref = _log_softmax(np.random.default_rng(2).normal(size=(4, 30)))
    rows = ReferenceRows.from_logprobs(ref, [0, 1, 2, 3], k=6)
    rows.save(tmp_path / "r.npz")
    back = ReferenceRows.load(tmp_path / "r.npz")
    assert np.array_equal(back.ids, rows.ids) and np.array_equal(back.logprobs, rows.logprobs)
    assert (np.diff(rows.logprobs, axis=1) <= 0).all()  # sorted, most likely first


def test_tolerance_parsing():
    assert parse_tolerance(None) == DEFAULT_TOLERANCE
    assert parse_tolerance("rmse=0.1, kld=0.5")["rmse"] == 0.1
    for bad in ("rmse", "speed=1", "kld=abc", "kld=-1"):
        with pytest.raises(ValueError, match="bad tolerance"):
            parse_tolerance(bad)


def _entry(quality, delta, kld=1e-3, error=None, vision_cos=0.99999):
    return ArtifactEntry(name="a", source="a", runtime="torch", device="cpu", dtype=None, format="safetensors", quant="none",
                         error=error, quality=quality, cost=Cost(*[None] * 7), delta=delta, parity={"kld_mean": kld},
                         vision={"cos_mean": vision_cos})


def test_gate_names_each_metric_out_of_tolerance():
    tol = dict(DEFAULT_TOLERANCE)
    ref = {"rmse": 0.5, "pearson": 0.9, "parse_failure_rate": 0.0}
    good = _entry({"rmse": 0.52, "pearson": 0.89, "parse_failure_rate": 0.0}, {"rmse": 0.02, "pearson": -0.01, "parse_failure_rate": 0.0})
    assert gate("pointwise", good, ref, tol) == []
    bad = _entry({"rmse": 0.6, "pearson": 0.85, "parse_failure_rate": 0.05}, {"rmse": 0.1, "pearson": -0.05, "parse_failure_rate": 0.05},
                 kld=0.2, vision_cos=0.9)
    failures = gate("pointwise", bad, ref, tol)
    assert [f.split(":")[0] for f in failures] == ["parse_failure_rate", "rmse", "pearson", "kld", "vision_cos"]
    undefined = _entry({"rmse": None, "pearson": None, "parse_failure_rate": 1.0}, {"rmse": None, "pearson": None, "parse_failure_rate": 1.0})
    assert any("undefined for the artifact" in f for f in gate("pointwise", undefined, ref, tol))
    pair_ref = {"accuracy": 0.9, "parse_failure_rate": 0.0}
    assert gate("pairwise", _entry({"accuracy": 0.895, "parse_failure_rate": 0}, {"accuracy": -0.005, "parse_failure_rate": 0}), pair_ref, tol) == []
    assert "accuracy: -2.00 points" in gate("pairwise", _entry({"accuracy": 0.88, "parse_failure_rate": 0}, {"accuracy": -0.02, "parse_failure_rate": 0}), pair_ref, tol)[0]
    assert gate("pairwise", _entry(None, None, kld=None), None, tol) == ["kld: no token could be compared with the reference"]
    assert gate("pairwise", _entry(None, None, vision_cos=None), None, tol) == [
        "vision_cos: no image's embeddings could be compared with the reference's"]
    assert gate("pairwise", _entry(None, None, error="boom"), None, tol) == ["run failed: boom"]


def test_an_artifact_with_a_missing_file_or_an_unreadable_manifest_is_an_error_naming_it(merged, tmp_path):
    import shutil

    good = _describe(str(merged("pairwise")))
    assert good.error is None and good.format == "safetensors" and good.size_bytes > 0
    broken = tmp_path / "broken"
    shutil.copytree(merged("pairwise"), broken)
    next(broken.glob("*.safetensors")).unlink()
    described = _describe(str(broken))
    assert "file(s) its dfj.json lists are missing: model" in described.error and str(broken) in described.error
    (broken / "dfj.json").write_text("{not json")
    assert _describe(str(broken)).error.startswith(f"cannot read {broken}")


def test_published_numbers_only_for_real_dfj_splits(tmp_path):
    assert published_for(tmp_path / "dfj-meta" / "dfj-meta-pointwise" / "test", "pointwise")["7B rmse"] == 0.61
    assert published_for(tmp_path / "dfj-meta-human" / "pairwise", "pairwise")["7B accuracy"] == 0.989
    assert published_for(tmp_path / "splits" / "pointwise" / "test", "pointwise") is None


def test_vision_parity_per_token_cosine_and_relative_l2():
    from dfj.bench.parity import summarize_vision, vision_parity

    rng = np.random.default_rng(0)
    reference = rng.normal(size=(16, 8)).astype(np.float32)
    same = vision_parity(reference, reference.copy())
    assert same["cos_min"] == pytest.approx(1.0) and same["rel_l2"] == 0.0
    damaged = reference.copy()
    damaged[3] = -damaged[3]  # one token's row flipped: its cosine is -1
    one = vision_parity(reference, damaged)
    assert one["cos_min"] == pytest.approx(-1.0) and one["cos_sum"] == pytest.approx(14.0)
    summary = summarize_vision([same, one, {"image": "x", "error": "boom"}])
    assert summary["images"] == 2 and summary["cos_mean"] == pytest.approx(30 / 32) and summary["errors"] == ["boom"]
    with pytest.raises(ValueError, match="split the image differently"):
        vision_parity(reference, reference[:8])


def _memory_cgroups_writable() -> bool:
    from benchmarks.memory import MemoryCap

    try:
        MemoryCap(1 << 30, "probe").close()
    except RuntimeError:
        return False
    return True


@pytest.mark.skipif(not _memory_cgroups_writable(), reason="needs a writable memory cgroup hierarchy (root)")
def test_a_memory_cap_kills_a_stage_that_needs_more_and_records_the_peak_of_one_that_fits():
    from benchmarks.memory import measure

    allocate = "import numpy as np; a = np.ones(400_000_000 // 8); print(a.sum())"
    fits = measure(allocate, cap=800_000_000, name="fits")
    assert fits.exit_code == 0, fits.output_tail
    assert fits.cap == 800_000_000 and fits.oom_kills == 0
    assert 400_000_000 <= fits.cgroup_peak <= 800_000_000
    killed = measure(allocate, cap=200_000_000, name="killed")
    assert killed.exit_code == -9 and killed.oom_kills == 1
    assert killed.cgroup_peak <= 200_000_000
