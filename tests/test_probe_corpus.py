"""The injection corpus and the probe's metrics, without a model: the corpus is versioned, every
template changes only the response it attacks, and the metrics count what they say."""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict

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
    assert all(math.isnan(x) for x in mean_interval([]))
    narrow = mean_interval([0.9, 1.0, 1.1] * 20)
    wide = mean_interval([-3.0, 1.0, 5.0] * 20)
    assert narrow[2] - narrow[1] < wide[2] - wide[1]
    assert mean_interval([0.0, 4.0, 1.0, 3.0], seed=1) == mean_interval([0.0, 4.0, 1.0, 3.0], seed=1)
