"""A table of hard pairs with expected verdicts, each checked in both directions where that is meaningful.

Every row is a known pitfall of some grader: a false positive (percent x100, unit stripping that eats a
variable, an equation that reduces to 0, open vs closed interval ends, float rounding on integer sets)
or a false negative (padded integers, `\\dfrac`, degrees, multiple answers in another order, "or").
"""

import pytest

from autocode4math.grading import grade, is_equivalent

# (gold, predicted answer, benchmark, expected verdict); each row is also checked with the two swapped
SYMMETRIC = [
    ("\\frac{1}{2}", "0.5", None, True),
    ("\\frac{1}{2}", "0.51", None, False),
    ("\\dfrac{3}{4}", "\\frac34", None, True),
    ("\\tfrac{3}{4}", "3/4", None, True),
    ("\\frac{3}{4}", "\\frac{4}{3}", None, False),
    ("90^\\circ", "90", None, True),
    ("90^{\\circ}", "45", None, False),
    ("\\frac{\\pi}{2}", "90^\\circ", None, False),  # no silent degree/radian conversion
    ("2\\pi", "\\pi \\cdot 2", None, True),
    ("\\pi", "3.14", None, False),
    ("\\sqrt{2}/2", "\\frac{1}{\\sqrt{2}}", None, True),
    ("2\\sqrt{3}", "\\sqrt{12}", None, True),
    ("\\sqrt{3}", "\\sqrt{2}", None, False),
    ("(1,2)", "\\left( 1, 2 \\right)", None, True),
    ("(1,2)", "(2,1)", None, False),
    ("(1,2)", "\\{1,2\\}", None, False),  # a pair is not a set
    ("\\{1,2\\}", "\\{2,1\\}", None, True),
    ("(1,2,3)", "(1,2)", None, False),
    ("(1,2)", "[1,2]", None, False),  # open vs closed ends
    ("(1,2]", "(1,2]", None, True),
    ("(1,2]", "[1,2)", None, False),
    ("[2,+\\infty)", "[2,\\infty)", None, True),
    ("(-\\infty,0)\\cup(1,2)", "(1,2)\\cup(-\\infty,0)", None, True),
    ("3+4i", "4i+3", None, True),
    ("3+4i", "3-4i", None, False),
    ("\\text{even}", "\\text{Even}", None, True),
    ("\\text{even}", "\\text{odd}", None, False),
    ("50\\%", "50", None, True),
    ("50\\%", "0.5", None, False),  # no percent x100 rule
    ("5", "5 m", None, False),  # a single letter is never stripped as a unit
    ("5", "5\\text{ cm}", None, True),
    ("12", "12 \\text{ square feet}", None, True),
    ("a", "b", None, False),
    ("x^2+1", "1+x^2", None, True),
    ("x^2+1", "x^2-1", None, False),
    ("1,000", "1000", None, True),
    ("2,900", "2900", "gaokao2023en", True),
    ("025", "25", "aime24", True),
    ("27.0", "27", "amc23", True),
    ("3159", "3159.3", "amc23", False),  # exact integers: no float rounding
    ("204", "203.9999999", "aime24", False),
    ("18", "18.00", "gsm8k", True),
    ("-1", "-1.0", "amc23", True),
]

# (gold, predicted answer, benchmark, expected verdict); direction matters here
ONE_WAY = [
    ("3", "x-3=0", None, False),  # an equation is not its right-hand side
    ("0", "x-3=0", None, False),  # ... even when that side equals the gold
    ("5", "x=5", None, True),  # a named value is its value
    ("2x", "f(x)=2x", None, True),
    ("25", "n=25", "aime24", True),
    ("113", "\\textbf{(113) }", "aime24", True),
    (["1", "2"], "2, 1", None, True),  # several answers in another order
    (["1", "2"], "1", None, False),
    (["1", "2"], "1, 2, 3", None, False),
    (["1", "2"], "1, 1", None, False),
    (["2", "-2"], "x=2 or x=-2", None, True),
    (["2", "-2"], "x = -2 \\text{ and } x = 2", None, True),
    (["2", "-2"], "x=2 or x=2", None, False),
    (["(1,8,19)", "(2,7,13)"], "(2,7,13), (1,8,19)", "olympiadbench", True),
    (["(1,8,19)", "(2,7,13)"], "(2,7,13), (1,8,18)", "olympiadbench", False),
    ("$2$ or $-2$", "-2 \\text{ or } 2", "gaokao2023en", True),
    ("$2$ or $-2$", "2", "gaokao2023en", False),
    ("$\\{x|-2\\leq x < 1\\}$", "[-2,1)", "gaokao2023en", True),
    ("$\\{x|-2\\leq x < 1\\}$", "[-2,1]", "gaokao2023en", False),
    ("\\{x \\mid x \\geq 3\\}", "[3, +\\infty)", "gaokao2023en", True),
    ("\\{x \\mid x \\geq 3\\}", "(3, +\\infty)", "gaokao2023en", False),
    ("\\{x|x<0\\}", "(-\\infty, 0)", "gaokao2023en", True),
    ("\\pi r^2", "r^2 \\pi", None, True),
    ("\\{1,3,5\\}", "\\{5,3,1\\}", None, True),
    ("\\{1,3,5\\}", "\\{1,3\\}", None, False),
    (27.0, "27", "amc23", True),
    (18, "18", "toy", True),
    (18, "81", "toy", False),
]


@pytest.mark.parametrize("gold, pred, benchmark, expected", SYMMETRIC)
def test_symmetric_pairs(gold, pred, benchmark, expected):
    assert is_equivalent(pred, gold, benchmark) is expected
    assert is_equivalent(gold, pred, benchmark) is expected


@pytest.mark.parametrize("gold, pred, benchmark, expected", ONE_WAY)
def test_one_way_pairs(gold, pred, benchmark, expected):
    assert is_equivalent(pred, gold, benchmark) is expected


@pytest.mark.parametrize(
    "response, gold, benchmark, pred, correct",
    [
        ("So the answer is 7, i.e. 7 apples.", "7", None, "7", True),  # the statement ends at ", word"
        ("The answer is $\\frac{1}{2}$.", "0.5", None, "\\frac{1}{2}", True),
        ("The final answer is: 42", "42", None, "42", True),
        ("I computed 42 and I'm done.", "42", None, None, False),  # unboxed, unstated: no answer
        ("I computed 42 and I'm done.", "42", "gsm8k", "42", True),  # GSM8K's last-number convention
        ("work\n#### 1,234", "1234", "gsm8k", "1,234", True),
        ("\\boxed{3} no wait, \\boxed{4}", "4", None, "4", True),  # the last box counts
        ("\\boxed{3} no wait, \\boxed{4}", "3", None, "4", False),
        ("\\boxed{5}\n```python\nprint(r'\\boxed{9}')\n```\n```output\n\\boxed{9}\n```", "5", None, "5", True),
        ("\\boxed{5}\n```python\nprint(r'\\boxed{9}')\n```\n```output\n\\boxed{9}\n```", "9", None, "5", False),
        ("```python\nx = r'\\boxed{9}'", "9", None, None, False),  # an unterminated block still hides its box
        ("$\\boxed{\\dfrac{3}{4}}$", "\\frac34", None, "\\dfrac{3}{4}", True),
        ("\\boxed{\\{1, \\frac{1}{2}\\}}", "\\{\\frac12, 1\\}", None, "\\{1, \\frac{1}{2}\\}", True),
        ("\\fbox{12}", "12", None, "12", True),
    ],
)
def test_responses_extract_then_grade(response, gold, benchmark, pred, correct):
    result = grade(response, gold, benchmark)
    assert (result.pred, result.correct, result.timed_out) == (pred, correct, False)
