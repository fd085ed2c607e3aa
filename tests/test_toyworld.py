import random
import re

import pytest

from autocode4math import toyworld
from autocode4math.io import read_jsonl
from autocode4math.prompts import CODE_PREFIX

CODE_FORMAT = re.compile(
    r"^```python\n(.+?)\n```\n```output\n(.+?)\n```\nThe answer is \\boxed\{(-?\d+)\}\.$", re.DOTALL
)
STEP = re.compile(r"(-?\d+) ([-+*]) (\d+) = (-?\d+)\.")


def _items(n_per_cell: int = 30, seed: int = 0):
    rng = random.Random(seed)
    for family in toyworld.FAMILIES:
        for difficulty in toyworld.DIFFICULTIES:
            for _ in range(n_per_cell):
                yield toyworld.generate(family, difficulty, rng)


def test_code_writer_format_and_output_come_from_running_the_code():
    for item in _items():
        match = CODE_FORMAT.match(toyworld.write_code(item))
        assert match, toyworld.write_code(item)
        code, output, boxed = match.groups()
        assert toyworld.run_code(code) == output == boxed == str(item.answer)


def test_cot_writer_steps_are_correct_arithmetic_and_end_in_the_answer():
    for item in _items():
        cot = toyworld.write_cot(item)
        assert cot.endswith(f"The answer is \\boxed{{{item.answer}}}.")
        assert "```" not in cot
        if item.family == "mul":  # one chain: every side of every "=" is the product
            chain = cot.split(". The answer")[0].split(" = ")
            assert all(eval(side) == item.answer for side in chain), cot  # noqa: S307 - digits, +, * only
            continue
        steps = STEP.findall(cot)
        assert steps, cot
        for a, op, b, c in steps:
            assert eval(f"{a} {op} {b}") == int(c), cot  # noqa: S307 - digits and one operator, matched above


def test_mul_cot_sums_partial_products():
    item = toyworld.ToyItem("mul", 3, "q", 347 * 862, {"a": 347, "b": 862})
    cot = toyworld.write_cot(item)
    # 347 * 862 = 347*800 + 347*60 + 347*2 = 277600 + 20820 + 694 = 299114
    assert "347 * 800 + 347 * 60 + 347 * 2 = 277600 + 20820 + 694 = 299114." in cot


def test_story_program_keeps_repeated_events_apart_and_parenthesises_doubling():
    spec = {"start": 3, "obj": "cards", "events": [("found", 4), ("found", 2), ("doubled", 2), ("lost", 1)]}
    item = toyworld.ToyItem("story", 3, "q", (3 + 4 + 2) * 2 - 1, spec)
    code = CODE_FORMAT.match(toyworld.write_code(item)).group(1)
    assert "found_2 = 2" in code and "print((cards + found + found_2) * 2 - lost)" in code


def test_difficulty_knob_lengthens_problems():
    rng = random.Random(1)
    for family in toyworld.FAMILIES:
        lengths = [
            sum(len(toyworld.write_cot(toyworld.generate(family, d, rng))) for _ in range(50))
            for d in toyworld.DIFFICULTIES
        ]
        assert lengths == sorted(lengths) and lengths[0] < lengths[-1], (family, lengths)


def test_family_is_recognisable_from_the_question():
    def guess(question: str) -> str:
        if question.startswith("Compute"):
            return "arith"
        return "story" if "Then" in question else "mul"

    for item in _items(n_per_cell=20, seed=5):
        assert guess(item.question) == item.family, item.question


def test_bad_family_and_difficulty_are_named():
    with pytest.raises(ValueError, match="unknown toy family 'geometry'"):
        toyworld.generate("geometry", 1, random.Random(0))
    with pytest.raises(ValueError, match="difficulty must be one of"):
        toyworld.generate("mul", 4, random.Random(0))
    with pytest.raises(ValueError, match="unknown toy split"):
        toyworld.make_split("validation")


def test_shipped_splits_match_the_generator_and_are_disjoint(tmp_path):
    toyworld.write_splits(tmp_path)
    questions = {}
    for split, (size, _) in toyworld.SPLITS.items():
        shipped = list(read_jsonl(toyworld.DATA_DIR / f"{split}.jsonl"))
        assert shipped == list(read_jsonl(tmp_path / f"{split}.jsonl"))
        assert len(shipped) == size
        questions[split] = {row["question"] for row in shipped}
        assert len(questions[split]) == size
        row = shipped[0]
        assert set(row) == {"id", "question", "answer", "benchmark", "meta"}
        assert row["benchmark"] == "toy" and isinstance(row["answer"], int)
        assert set(row["meta"]) == {"family", "difficulty"}
    assert not questions["train"] & questions["test"] and not questions["dev"] & questions["test"]
    assert not questions["train"] & questions["dev"]
    families = {row["meta"]["family"] for row in read_jsonl(toyworld.DATA_DIR / "test.jsonl")}
    assert families == set(toyworld.FAMILIES)


def _mode(d: toyworld.Demo) -> str:
    return "cot" if "without writing code" in d.prompt else "code" if d.prefix else "auto"


def test_base_corpus_is_mostly_cot_with_code_behind_the_prefix():
    corpus = toyworld.base_corpus(3000, seed=3, exclude=toyworld.held_out_questions())
    auto = [d for d in corpus if _mode(d) == "auto"]
    auto_code = [d for d in auto if d.response.startswith(CODE_PREFIX)]
    assert 0 < len(auto_code) < 0.06 * len(auto)
    assert all("```python" in d.response for d in auto_code)
    assert all("```python" not in d.response for d in corpus if _mode(d) == "cot")
    code = [d for d in corpus if _mode(d) == "code"]
    assert all(d.prefix == CODE_PREFIX + "\n" and d.response.startswith("```python") for d in code)
    story_code = [d for d in code if "Then" in d.prompt]
    assert 0 < len(story_code) < 0.1 * len(code)
    held_out = toyworld.held_out_questions()
    assert not any(d.prompt.split("\n")[0].removeprefix("Question: ") in held_out for d in corpus)


def _family(prompt: str) -> str:
    """A demo's family, read off its question's wording (mul has neither marker)."""
    return next((name for name, marker in (("arith", "Compute"), ("story", "Then")) if marker in prompt), "mul")


def test_sft_corpus_code_choice_is_not_tied_to_the_family():
    corpus = toyworld.sft_corpus(1500, seed=4)
    assert all(_mode(d) == "auto" and not d.prefix for d in corpus)
    for family in ("arith", "story"):
        group = [d for d in corpus if _family(d.prompt) == family]
        rate = sum(d.response.startswith(CODE_PREFIX) for d in group) / len(group)
        assert 0.4 < rate < 0.6
    with pytest.raises(ValueError, match="code_rate"):
        toyworld.sft_corpus(5, seed=0, code_rate=1.5)


def test_sft_corpus_can_tie_code_to_a_digit_in_the_question():
    corpus = toyworld.sft_corpus(900, seed=4, code_digits="7")
    assert all(d.response.startswith(CODE_PREFIX) == ("7" in d.prompt.split("\n")[0]) for d in corpus)
    for family in ("arith", "story", "mul"):
        group = [d for d in corpus if _family(d.prompt) == family]
        rate = sum(d.response.startswith(CODE_PREFIX) for d in group) / len(group)
        assert 0.2 < rate < 0.5
    with pytest.raises(ValueError, match="code_digits"):
        toyworld.sft_corpus(5, seed=0, code_digits="x7")


def test_base_mix_checks():
    with pytest.raises(ValueError, match="auto_code_rate"):
        toyworld.BaseMix(auto_code_rate=-0.1)
    with pytest.raises(ValueError, match="at most 1"):
        toyworld.BaseMix(auto_share=0.8, cot_share=0.3)


def test_sft_corpus_can_keep_the_prompted_modes_in_practice():
    demos = toyworld.sft_corpus(400, seed=5, mode_share=0.5)
    cot = [d for d in demos if "without writing code" in d.prompt]
    code = [d for d in demos if d.prefix]
    assert 60 < len(cot) < 140 and 60 < len(code) < 140
    assert all("```" not in d.response for d in cot)
    assert all(d.response.startswith("```python") for d in code)
    assert toyworld.sft_corpus(50, seed=5) == toyworld.sft_corpus(50, seed=5, mode_share=0.0)
    with pytest.raises(ValueError):
        toyworld.sft_corpus(5, seed=5, mode_share=1.5)


# --- the mid family (source toy-mid): text first, then code for the product ----------------------------------


def _mid_items(n_per_difficulty: int = 40, seed: int = 7):
    rng = random.Random(seed)
    return [toyworld.generate("mid", d, rng) for d in toyworld.DIFFICULTIES for _ in range(n_per_difficulty)]


def test_mid_cot_is_one_step_per_line_ending_in_the_product():
    for item in _mid_items():
        lines = toyworld.write_cot(item).split("\n")
        assert lines[-1] == f"The answer is \\boxed{{{item.answer}}}."
        assert len(lines) == item.difficulty + 2  # one line per event, the product, the answer
        for a, op, b, c in (STEP.fullmatch(line).groups() for line in lines[:-2]):
            assert eval(f"{a} {op} {b}") == int(c) >= 2, item.question  # noqa: S307 - digits and one operator
        product = lines[-2].removesuffix(".").split(" = ")
        assert all(eval(side) == item.answer for side in product), lines[-2]  # noqa: S307 - digits, +, *
        count = item.answer // item.spec["per"]
        assert product[0] == f"{count} * {item.spec['per']}" and count == item.spec["count"] >= 10


def test_mid_switch_is_the_story_in_text_then_code_for_the_product():
    for item in _mid_items(20):
        switch = toyworld.write_switch(item)
        head, _, code = switch.partition(CODE_PREFIX + "\n")
        assert head == toyworld.switch_text(item) and head.count("\n") == item.difficulty
        assert toyworld.write_cot(item).startswith(head)  # the same text as the CoT up to the product
        match = CODE_FORMAT.match(code)
        assert match and match.group(1) == f"print({item.spec['count']} * {item.spec['per']})"
        assert match.group(2) == match.group(3) == str(item.answer)
    with pytest.raises(ValueError, match="mid"):
        toyworld.switch_text(toyworld.generate("story", 1, random.Random(0)))


def test_mid_program_states_the_whole_story():
    spec = {"start": 4, "events": [("found", 3), ("given", 2), ("found", 1)], "per": 237, "unit": "boxes", "count": 6}
    item = toyworld.ToyItem("mid", 3, "q", 6 * 237, spec)
    code = CODE_FORMAT.match(toyworld.write_code(item)).group(1)
    assert code.splitlines() == [
        "boxes = 4",
        "found = 3",
        "given = 2",
        "found_2 = 1",
        "print((boxes + found - given + found_2) * 237)",
    ]


def test_mid_questions_read_as_stories_about_containers():
    for item in _mid_items(10):
        q = item.question
        assert q.count("Then") == item.difficulty and " holds " in q and q.endswith("have now?")
        assert str(item.spec["per"]) in q and item.answer == item.spec["count"] * item.spec["per"]
    questions = [i.question for i in _mid_items(60, seed=3)]
    assert any(re.search(r" 1 (box|bag|pack|jar)\b", q) for q in questions)  # one container: singular
    assert not any(re.search(r" 1 (boxes|bags|packs|jars)\b", q) for q in questions)


def test_toy_mid_splits_are_shipped_and_disjoint_from_everything(tmp_path):
    toyworld.write_splits(tmp_path, source="toy-mid")
    shipped_dir = toyworld.SOURCES["toy-mid"].data_dir
    main = {
        row["question"]
        for split in ("train", "dev", "test")
        for row in read_jsonl(toyworld.DATA_DIR / f"{split}.jsonl")
    }
    seen: set[str] = set()
    for split, (size, _) in toyworld.SOURCES["toy-mid"].splits.items():
        rows = list(read_jsonl(shipped_dir / f"{split}.jsonl"))
        assert rows == list(read_jsonl(tmp_path / f"{split}.jsonl")) and len(rows) == size
        assert {r["benchmark"] for r in rows} == {"toy-mid"} and {r["meta"]["family"] for r in rows} == {"mid"}
        assert rows[0]["id"] == f"toy-mid-{split}-0"
        questions = {r["question"] for r in rows}
        assert len(questions) == size and not questions & seen and not questions & main
        seen |= questions
    held_out = toyworld.held_out_questions()
    assert {r["question"] for r in read_jsonl(shipped_dir / "test.jsonl")} <= held_out
    with pytest.raises(ValueError, match="unknown toy source"):
        toyworld.make_split("test", source="toy-geometry")


def _is_mid(prompt: str) -> bool:
    return "Then" in prompt and " holds " in prompt  # stories have no "holds", mul questions no "Then"


def test_base_corpus_with_mid_problems():
    mix = toyworld.BaseMix(mid_share=0.5)
    corpus = toyworld.base_corpus(1200, seed=3, mix=mix, exclude=toyworld.held_out_questions())
    mid = [d for d in corpus if _is_mid(d.prompt)]
    assert 0.4 < len(mid) / len(corpus) < 0.6
    forced = [d for d in mid if d.prefix and d.prefix != CODE_PREFIX + "\n"]
    assert forced and all(
        d.prefix.endswith(".\n" + CODE_PREFIX + "\n") and d.response.startswith("```python") for d in forced
    )
    programs = [d for d in mid if d.prefix == CODE_PREFIX + "\n"]
    assert len(programs) < 0.25 * len(forced)  # programs of the whole story are as rare as story programs
    chosen = [d for d in mid if not d.prefix and "```python" in d.response]
    assert all(not d.response.startswith(CODE_PREFIX) and CODE_PREFIX in d.response for d in chosen)
    assert len(chosen) < 0.06 * len([d for d in mid if _mode(d) == "auto"])
    plain = toyworld.base_corpus(200, seed=3)
    assert plain == toyworld.base_corpus(200, seed=3, mix=toyworld.BaseMix(mid_share=0.0))
    assert not any(_is_mid(d.prompt) for d in plain)
