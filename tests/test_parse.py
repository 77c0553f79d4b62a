import pytest

from dfj.parse import parse_pairwise, parse_pointwise


@pytest.mark.parametrize(
    "text,score,reasoning",
    [
        ("<reasoning>Good grounding.</reasoning>\n<score>5</score>", 5, "Good grounding."),
        ("<reasoning>x</reasoning>\n<score> 3 </score>\n", 3, "x"),
        ("<reasoning>quotes <answer>fake</answer> from the response</reasoning>\n<score>2</score>", 2,
         "quotes <answer>fake</answer> from the response"),
        ("<score>1</score>", 1, None),  # the score is the verdict; a missing rationale is not fatal
    ],
)
def test_pointwise_valid(text, score, reasoning):
    verdict = parse_pointwise(text)
    assert (verdict.score, verdict.reasoning, verdict.error, verdict.text) == (score, reasoning, None, text)


@pytest.mark.parametrize(
    "text,problem",
    [
        ("", "empty"),
        ("   \n", "empty"),
        ("<reasoning>no score</reasoning>", "no <score>"),
        ("<reasoning>a</reasoning>\n<score>6</score>", "outside 1-5"),
        ("<reasoning>a</reasoning>\n<score>0</score>", "outside 1-5"),
        ("<reasoning>a</reasoning>\n<score>-1</score>", "not an integer"),
        ("<reasoning>a</reasoning>\n<score>4.5</score>", "not an integer"),
        ("<reasoning>a</reasoning>\n<score>four</score>", "not an integer"),
        ("<reasoning>a</reasoning>\n<score></score>", "not an integer"),
        ("<reasoning>a</reasoning>\n<score>3</score><score>4</score>", "2 <score> tags"),
        ("<reasoning>a <score>2</score></reasoning>\n<score>4</score>", "2 <score> tags"),
        ("<reasoning>a</reasoning><reasoning>b</reasoning>\n<score>4</score>", "2 <reasoning> blocks"),
        ("<reasoning>a</reasoning>\n<score>3", "no <score>"),
        ("score: 4", "no <score>"),
    ],
)
def test_pointwise_malformed_is_an_error_not_a_score(text, problem):
    verdict = parse_pointwise(text)
    assert verdict.score is None
    assert verdict.error is not None and problem in verdict.error
    assert verdict.text == text


@pytest.mark.parametrize("text,choice", [("<answer>A</answer>", "A"), ("<answer> B </answer>\n", "B"),
                                         ("Response B is better.\n<answer>B</answer>", "B")])
def test_pairwise_valid(text, choice):
    verdict = parse_pairwise(text)
    assert (verdict.choice, verdict.error) == (choice, None)


@pytest.mark.parametrize(
    "text,problem",
    [
        ("", "empty"),
        ("A", "no <answer>"),
        ("<answer>C</answer>", "not A or B"),
        ("<answer>a</answer>", "not A or B"),
        ("<answer>A or B</answer>", "not A or B"),
        ("<answer>{A_or_B}</answer>", "not A or B"),
        ("<answer>A</answer><answer>B</answer>", "2 <answer> tags"),
        ("<answer>A</answer> <answer>A</answer>", "2 <answer> tags"),
        ("<answer>A", "no <answer>"),
    ],
)
def test_pairwise_malformed_is_an_error(text, problem):
    verdict = parse_pairwise(text)
    assert verdict.choice is None and problem in verdict.error
