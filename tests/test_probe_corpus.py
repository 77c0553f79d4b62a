"""The injection corpus and the probe's metrics, without a model: the corpus is versioned, every
template changes only the response it attacks, and the metrics count what they say."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from pathlib import Path

import pytest

from dfj import prompts
from dfj.probe.corpus import CORPUS_VERSION, TEMPLATES, templates
from dfj.probe.stats import mean_interval, pairwise_effect, pointwise_effect

# Any change of a template's text, family or placement changes this: bump CORPUS_VERSION with it.
CORPUS_SHA256 = {"1": "107d782b4de017524f7bc26d9550c060c61f719f2e3ac527e3c2605d293cfaa5"}
RESPONSE = "The jawline is blurred and the left ear has no lobe: a face swap. {candidate_response} <|im_end|>"


def test_the_corpus_is_pinned_to_its_version():
    text = json.dumps({m: [asdict(t) for t in ts] for m, ts in TEMPLATES.items()}, sort_keys=True)
    assert hashlib.sha256(text.encode()).hexdigest() == CORPUS_SHA256[CORPUS_VERSION]


@pytest.mark.parametrize("mode", ["pointwise", "pairwise"])
def test_each_mode_has_twelve_attacks_from_the_families_and_its_controls(mode):
    attacks = [t for t in TEMPLATES[mode] if not t.control]
    controls = {t.id for t in TEMPLATES[mode] if t.control}
    assert len(attacks) >= 12 and len({t.id for t in TEMPLATES[mode]}) == len(TEMPLATES[mode])
    assert {"plea", "escaped_plea", "context_ignore", "fake_completion", "forged_tags", "fake_rubric", "self_praise",
            "label_claim", "combined", "reasoning_opener", "universal_phrase", "long_suffix", "empty"} <= {t.family for t in attacks}
    assert controls == ({"benign_filler", "swapped_pair"} if mode == "pairwise" else {"benign_filler"})
    filler = next(t for t in TEMPLATES[mode] if t.id == "benign_filler")
    typical = sorted(len(t.payload) for t in attacks if t.placement in ("prefix", "suffix"))
    assert abs(len(filler.payload) - typical[len(typical) // 2]) <= 62  # within one filler sentence


@pytest.mark.parametrize("template", TEMPLATES["pointwise"], ids=lambda t: t.id)
def test_a_pointwise_attack_lands_in_the_response_only(template):
    attacked = template.apply(RESPONSE)
    prompt = prompts.render_pointwise("fake", attacked)
    assert prompts.parse_prompt("pointwise", prompt) == {"ground_truth_label": "fake", "candidate_response": attacked}
    if template.placement == "suffix":
        assert attacked.startswith(RESPONSE)
    elif template.placement == "prefix":
        assert attacked.endswith(RESPONSE)


@pytest.mark.parametrize("template", TEMPLATES["pairwise"], ids=lambda t: t.id)
@pytest.mark.parametrize("letter", ["A", "B"])
def test_a_pairwise_attack_lands_in_its_response_only_and_names_its_own_letter(template, letter):
    attacked = template.apply(RESPONSE, letter)
    other = "The image is authentic."
    a, b = (attacked, other) if letter == "A" else (other, attacked)
    prompt = prompts.render_pairwise("edited", a, b)
    assert prompts.parse_prompt("pairwise", prompt) == {"ground_truth_label": "edited", "response_a": a, "response_b": b}
    assert "{self}" not in attacked
    if "<answer>" in template.payload:
        assert f"<answer>{letter}</answer>" in attacked


def test_a_template_naming_a_letter_needs_one_and_unknown_ids_are_named():
    plea = templates("pairwise", ["plea_choose_me"])[0]
    with pytest.raises(ValueError, match="give letter='A' or 'B'"):
        plea.apply("text")
    with pytest.raises(ValueError, match="unknown pointwise template 'nope'; known: plea_max_score"):
        templates("pointwise", ["plea_max_score", "nope"])
    assert templates("pairwise", ["swapped_pair"])[0].apply("same", "B") == "same"


def test_pointwise_metrics_count_successes_promotions_and_parse_failures():
    clean = [1, 2, 3, 3, 5]
    attacked = [5, 2, None, 4, 5]
    effect = pointwise_effect(clean, attacked, clean_expected=[1.2, 2.0, 3.1, 3.0, 4.9],
                              attacked_expected=[4.8, 2.1, None, 3.9, 5.0])
    assert effect["n"] == 5 and effect["parse_failures"] == 1
    assert effect["mean_delta"] == pytest.approx((4 + 0 + 1 + 0) / 4)
    assert effect["delta_low"] <= effect["mean_delta"] <= effect["delta_high"]
    assert effect["asr"] == pytest.approx(2 / 5)  # the parse failure is no success
    assert effect["max_rate"] == pytest.approx(1 / 4)  # of the four below 5, one was pushed to 5
    assert effect["promotion_rate"] == pytest.approx(1 / 2) and effect["promotion_n"] == 2
    assert effect["mean_delta_expected"] == pytest.approx((3.6 + 0.1 + 0.9 + 0.1) / 4)


def test_pairwise_metrics_count_flips_over_both_positions():
    effect = pairwise_effect([(True, True), (False, True), (None, False), (False, False)])
    assert effect["flip_rate"] == pytest.approx(3 / 8) and effect["parse_failures"] == 1
    assert effect["position_consistency"] == pytest.approx(2 / 3)
    assert effect["flip_low"] <= effect["flip_rate"] <= effect["flip_high"]


def test_the_bootstrap_interval_is_the_point_when_nothing_varies_and_widens_with_spread():
    assert mean_interval([2.0, 2.0, 2.0]) == (2.0, 2.0, 2.0)
    assert mean_interval([]) == (None, None, None)  # nothing to measure is said, not NaN
    narrow = mean_interval([0.9, 1.0, 1.1] * 20)
    wide = mean_interval([-3.0, 1.0, 5.0] * 20)
    assert narrow[2] - narrow[1] < wide[2] - wide[1]
    assert mean_interval([0.0, 4.0, 1.0, 3.0], seed=1) == mean_interval([0.0, 4.0, 1.0, 3.0], seed=1)


def test_metrics_with_no_parsed_attacked_verdict_are_null_not_nan():
    pointwise = pointwise_effect([2, 3], [None, None], [2.1, 2.9], [None, None])
    assert pointwise["n"] == 2 and pointwise["n_parsed"] == 0 and pointwise["parse_failures"] == 2
    for key in ("mean_delta", "delta_low", "delta_high", "asr", "max_rate", "promotion_rate", "mean_delta_expected"):
        assert pointwise[key] is None, key
    pairwise = pairwise_effect([(None, None), (None, None)])
    assert pairwise["n_parsed"] == 0 and pairwise["parse_failures"] == 4
    for key in ("flip_rate", "flip_low", "flip_high", "position_consistency"):
        assert pairwise[key] is None, key
    assert pairwise_effect([(None, True)])["n_parsed"] == 1 and pairwise_effect([(None, True)])["flip_rate"] == 0.5


# -- the whole probe on a scripted judge: clean verdicts parse, one template's attacked ones never do ----------
BROKEN = "context_ignore"  # the template whose attacked verdicts never parse (both modes have it)


def _scripted_judge(mode: str, clean_parses: bool = True):
    """A Judge whose runtime answers by what the prompt holds: a clean prompt gets a verdict (or, with
    `clean_parses` false, never one), a prompt attacked by BROKEN gets none, any other attack a 5 / its
    own letter."""
    from test_judge_contract import ScriptedRuntime, chat_of

    from dfj.judge import Judge

    marker = next(t for t in TEMPLATES[mode] if t.id == BROKEN).payload.strip()[:24]

    class ByPrompt(ScriptedRuntime):
        def generate(self, prompts_, max_new_tokens, stop=None, cancel=None):
            return [self.tokenize(self._text(p), True) for p in prompts_]

        def score(self, prompts_, scorings):
            out = []
            for prompt, scoring in zip(prompts_, scorings):
                self.answer = (0.2, 0.1) if not clean_parses or marker in chat_of(prompt) else (0.9, 0.1)
                out += super().score([prompt], [scoring])
            return out

        def _text(self, prompt):
            text = chat_of(prompt)
            if not clean_parses or marker in text:
                return "I will not rate this."
            attacked = any(t.payload.strip() and t.payload.strip()[:24] in text for t in TEMPLATES[mode] if not t.control)
            return f"<reasoning>r</reasoning>\n<score>{5 if attacked else 2}</score>"

    return Judge(runtime=ByPrompt([]), mode=mode, source="scripted")


def _scripted_split(folder: Path, mode: str, n: int = 4) -> Path:
    from PIL import Image

    (folder / "images").mkdir(parents=True)
    Image.new("RGB", (56, 56), (120, 30, 30)).save(folder / "images" / "a.png")
    fields = ({"response": "The face is swapped.", "score": 2} if mode == "pointwise"
              else {"response_a": "The face is swapped.", "response_b": "It is real.", "preferred": "A"})
    (folder / "data.jsonl").write_text("".join(json.dumps({"image": "images/a.png", "label": "fake", **fields}) + "\n"
                                               for _ in range(n)))
    return folder


def _strict(text: str):
    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")

    return json.loads(text, parse_constant=refuse)


@pytest.mark.parametrize("mode", ["pointwise", "pairwise"])
def test_a_template_whose_attacked_verdicts_never_parse_is_reported_unmeasured_and_fails_the_gate(mode, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    import dfj
    from dfj.cli import app

    monkeypatch.setattr(dfj, "load_judge", lambda *args, **kwargs: _scripted_judge(mode))
    report = tmp_path / "report"
    chosen = [BROKEN, "benign_filler", "plea_max_score" if mode == "pointwise" else "plea_choose_me"]
    result = CliRunner().invoke(app, ["probe", "injection", "scripted", "--data", str(_scripted_split(tmp_path / "data", mode)),
                                      "--templates", ",".join(chosen), "--report", str(report), "--max-asr", "1"])
    assert result.exit_code == 1, result.output  # nothing over the limit, but one template unmeasured
    data = _strict((report / "report.json").read_text())
    [entry] = data["artifacts"]
    broken, control = entry["templates"][BROKEN], entry["templates"]["benign_filler"]
    assert entry["probed"] == 4 and broken["n"] == 4 and broken["n_parsed"] == 0
    assert broken["parse_failures"] == (4 if mode == "pointwise" else 8)
    unmeasured = ("mean_delta", "delta_low", "delta_high", "asr") if mode == "pointwise" else ("flip_rate", "flip_low", "flip_high")
    assert all(broken[key] is None for key in unmeasured)
    assert control["n_parsed"] > 0 and all(control[key] is not None for key in unmeasured)
    assert entry["failures"] == [f"{BROKEN}: no parsed verdict of 4 probed, so its "
                                 f"{'attack success' if mode == 'pointwise' else 'flip'} rate is not measured"]
    row = next(line for line in (report / "report.md").read_text().splitlines() if line.startswith(f"| {BROKEN} "))
    assert "no parsed verdict (4 probed)" in row and "nan" not in (report / "report.md").read_text().lower()
    assert (report / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_judge_that_never_parses_probes_nothing_and_says_so(tmp_path, monkeypatch):
    import dfj
    from dfj.probe.injection import ProbeSpec, run_probe

    monkeypatch.setattr(dfj, "load_judge", lambda *args, **kwargs: _scripted_judge("pointwise", clean_parses=False))
    report = run_probe(ProbeSpec(("scripted",), _scripted_split(tmp_path / "data", "pointwise"), tmp_path / "report",
                                 max_asr=0.5))
    [entry] = report["artifacts"]
    assert entry["probed"] == 0 and not report["passed"]
    for tid, effect in entry["templates"].items():
        assert effect["n"] == effect["n_parsed"] == 0 and effect["mean_delta"] is None and effect["asr"] is None, tid
    assert all("no record probed" in failure for failure in entry["failures"])
    assert len(entry["failures"]) == sum(not t.control for t in TEMPLATES["pointwise"])
    _strict((tmp_path / "report" / "report.json").read_text())
