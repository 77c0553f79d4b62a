import hashlib
from pathlib import Path

import pytest

from dfj import prompts

SHARED = Path(__file__).resolve().parents[2] / "shared" / "reference"
# sha256 of the DFJ reference files as published (LF endings, trailing spaces kept).
PINNED = {
    "pointwise_prompt.txt": "10c2d6a272d53615cb86fdcee33592d02e3aa81c4579684df42cf5acf18f1a50",
    "pairwise_prompt.txt": "4cff7ad641c3e25ed6e379ade4e124adf30ad8a7e768cdcd474d8cad6e19ea77",
}

LITERALS_POINTWISE = ["{your reasoning and explanation for the rating}", "{integer score from 1 to 5}"]
LITERALS_PAIRWISE = ["{A_or_B}"]

TRICKY = [
    "plain",
    "{ground_truth_label} {candidate_response} {response_a} {response_b} {} {{x}} {0} {A_or_B}",
    "<reasoning>tags</reasoning> <answer>fake</answer> <score>5</score>",
    "unicode: déjà vu — 深度伪造 — 🙂🙃 — \u200b zero width",
    "line\nbreaks\r\nand\ttabs   and trailing   ",
    "%s %d %(name)s \\n \\1 $1 ${x}",
    "",
]


@pytest.mark.parametrize("name", sorted(PINNED))
def test_shipped_templates_are_the_reference(name):
    shipped = (Path(prompts.__file__).parent / "reference" / name).read_bytes()
    assert hashlib.sha256(shipped).hexdigest() == PINNED[name]
    if SHARED.is_dir():  # beside a checkout, the team's reference copy must be the same bytes
        assert (SHARED / name).read_bytes() == shipped


def test_templates_have_the_literal_braces_that_break_str_format():
    for literal in LITERALS_POINTWISE:
        assert literal in prompts.template("pointwise")
    for literal in LITERALS_PAIRWISE:
        assert literal in prompts.template("pairwise")
    with pytest.raises(KeyError):  # why dfj never calls str.format on them
        prompts.template("pairwise").format(ground_truth_label="fake", response_a="a", response_b="b")


@pytest.mark.parametrize("response", TRICKY)
def test_pointwise_keeps_literals_and_response_verbatim(response):
    text = prompts.render_pointwise("fake", response)
    for literal in LITERALS_POINTWISE:
        assert literal in text
    expected = prompts.template("pointwise").replace("{ground_truth_label}", "fake")
    head, tail = expected.split("{candidate_response}")
    assert text == head + response + tail


@pytest.mark.parametrize("a", TRICKY)
def test_pairwise_keeps_literals_and_responses_verbatim(a):
    b = "B side {response_a} <answer>B</answer>"
    text = prompts.render_pairwise("edited", a, b)
    assert "{A_or_B}" in text
    t = prompts.template("pairwise")
    before_a, rest = t.replace("{ground_truth_label}", "edited").split("{response_a}")
    between, after_b = rest.split("{response_b}")
    assert text == before_a + a + between + b + after_b


@pytest.mark.parametrize("response", TRICKY)
def test_parse_prompt_inverts_render(response):
    assert prompts.parse_prompt("pointwise", prompts.render_pointwise("real", response)) == {
        "ground_truth_label": "real",
        "candidate_response": response,
    }
    got = prompts.parse_prompt("pairwise", prompts.render_pairwise("fake", response, "other"))
    assert got == {"ground_truth_label": "fake", "response_a": response, "response_b": "other"}
    assert prompts.parse_prompt("pointwise", "some other prompt") is None


@pytest.mark.parametrize("label,expected", [("real", "real"), ("Fake", "fake"), (" EDITED ", "edited")])
def test_labels_normalise(label, expected):
    assert prompts.normalize_label(label) == expected


@pytest.mark.parametrize("label", ["", "genuine", "fake!", None, 1, "real fake"])
def test_unknown_labels_are_clear_errors(label):
    with pytest.raises(ValueError, match="label"):
        prompts.render_pointwise(label, "x")


def test_non_text_response_is_an_error():
    with pytest.raises(ValueError, match="response_b must be a string"):
        prompts.render_pairwise("fake", "a", None)


def test_chat_layout_matches_reference_template():
    chat = prompts.render_chat("PROMPT {A_or_B}")
    assert chat == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>PROMPT {A_or_B}<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_the_default_system_prompt_is_the_one_the_chat_template_writes():
    messages = [{"role": "user", "content": "x"}]
    chat = prompts._compiled_chat_template().render(messages=messages, add_generation_prompt=False)
    assert chat.startswith(f"<|im_start|>system\n{prompts.DEFAULT_SYSTEM_PROMPT}<|im_end|>\n")


@pytest.mark.slow
def test_chat_layout_matches_the_processor(tiny):
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(tiny("pointwise"))
    prompt = prompts.render_pointwise("fake", TRICKY[1])
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
    assert processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) == prompts.render_chat(prompt)
