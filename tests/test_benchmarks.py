"""The loader: the six shipped sets, toy splits, user files, field detection and errors that name the line."""

import json

import pytest

from autocode4math import benchmarks
from autocode4math.benchmarks import BENCHMARKS, Problem, load_problems
from autocode4math.io import DataError

pytestmark = pytest.mark.filterwarnings("ignore:gaokao2023en. left out")
SIZES = {"gsm8k": 1319, "math500": 500, "gaokao2023en": 383, "olympiadbench": 675, "aime24": 30, "amc23": 40}


@pytest.mark.parametrize("name", BENCHMARKS)
def test_shipped_sets_load_whole_with_unique_string_ids(name):
    problems = load_problems(name)
    assert len(problems) == SIZES[name]
    assert all(isinstance(p.id, str) and p.benchmark == name and p.question.strip() for p in problems)
    assert len({p.id for p in problems}) == len(problems)


def test_empty_golds_are_left_out_loudly():
    with pytest.warns(UserWarning, match=r"gaokao2023en: left out 2 .*HMMT2023General_9.*052023SATS4_11"):
        problems = load_problems("gaokao2023en")
    assert {"HMMT2023General_9", "052023SATS4_11"}.isdisjoint(p.id for p in problems)


def test_provenance_note_ships_beside_the_data():
    note = (benchmarks.DATA_DIR / "benchmarks" / "README.md").read_text()
    assert "never train on them" in note and "MIT" in note


def test_gold_conventions_are_normalised():
    gsm = load_problems("gsm8k", limit=3)
    assert [p.answer for p in gsm] == ["18", "3", "70000"]  # after '####', thousands separator dropped
    assert "####" in gsm[0].meta["solution"]
    assert load_problems("amc23")[0].answer == "27"  # stored as 27.0
    assert load_problems("aime24")[0].answer == "204"
    olympiad = {p.id: p for p in load_problems("olympiadbench")}
    assert olympiad["1618"].answer == ["(1,8,19)", "(2,7,13)", "(4,5,7)"]  # is_multiple_answer: a list
    assert olympiad["1606"].answer == "2" and olympiad["1606"].meta["is_multiple_answer"] is False
    math500 = load_problems("math500", limit=1)[0]
    assert math500.id == "math500-1" and "\\boxed" in math500.meta["solution"]


def test_limit_and_bad_limit():
    assert len(load_problems("math500", limit=7)) == 7
    with pytest.raises(ValueError, match="limit"):
        load_problems("math500", limit=-1)


def test_user_jsonl_detects_fields_and_synthesises_ids(tmp_path):
    path = tmp_path / "mine.jsonl"
    path.write_text(
        json.dumps({"problem": "1+1?", "final_answer": 2})
        + "\n\n"
        + json.dumps({"problem": "2+2?", "final_answer": 4.0})
        + "\n"
    )
    problems = load_problems(str(path))
    assert [(p.id, p.question, p.answer, p.benchmark) for p in problems] == [
        ("mine-1", "1+1?", 2, "mine"),  # answers kept as given; the grader reads numbers
        ("mine-2", "2+2?", 4.0, "mine"),
    ]


def test_user_fields_named_explicitly_and_meta_kept(tmp_path):
    path = tmp_path / "q.json"
    rows = [{"key": "a", "text": "What is 3?", "gold": "3", "level": 5}]
    path.write_text(json.dumps({"data": rows}))
    [p] = load_problems(str(path), question_field="text", answer_field="gold", id_field="key", benchmark="aime24")
    assert (p.id, p.question, p.answer, p.benchmark, p.meta) == ("a", "What is 3?", "3", "aime24", {"level": 5})
    with pytest.raises(DataError, match="no field 'missing'"):
        load_problems(str(path), question_field="missing")


def test_parquet_file(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    path = tmp_path / "p.parquet"
    pq.write_table(pa.table({"question": ["x?", "y?"], "answer": ["1", "2"], "id": [10, 11]}), path)
    assert [(p.id, p.answer) for p in load_problems(str(path))] == [("10", "1"), ("11", "2")]


def test_malformed_line_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"question": "a", "answer": "1"}\n{"question": "b", "answer": \n')
    with pytest.raises(DataError, match=r"bad\.jsonl:2"):
        load_problems(str(path))


@pytest.mark.parametrize(
    "row, message",
    [
        ({"question": "a"}, "no answer field"),
        ({"question": "a", "answer": ""}, "empty answer"),
        ({"answer": "1"}, "no question field"),
        ({"question": " ", "answer": "1"}, "empty question"),
    ],
)
def test_bad_rows_are_errors_not_skips(tmp_path, row, message):
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps({"question": "ok", "answer": "1"}) + "\n" + json.dumps(row) + "\n")
    with pytest.raises(DataError, match=rf"rows\.jsonl:2: .*{message}"):
        load_problems(str(path))


def test_duplicate_ids_are_an_error(tmp_path):
    path = tmp_path / "dup.jsonl"
    path.write_text("".join(json.dumps({"id": 1, "question": "q", "answer": "1"}) + "\n" for _ in range(2)))
    with pytest.raises(DataError, match="duplicate id '1'"):
        load_problems(str(path))


def test_missing_file_and_unsupported_type(tmp_path):
    with pytest.raises(DataError, match="nope.jsonl: no such file"):
        load_problems(str(tmp_path / "nope.jsonl"))
    other = tmp_path / "x.csv"
    other.write_text("question,answer\n")
    with pytest.raises(DataError, match="unsupported file type"):
        load_problems(str(other))


def test_toy_split_loads_normalised_rows(tmp_path, monkeypatch):
    (tmp_path / "toy").mkdir()
    row = {"id": "t0", "question": "2+3?", "answer": 5, "benchmark": "toy", "meta": {"family": "add", "difficulty": 1}}
    (tmp_path / "toy" / "dev.jsonl").write_text(json.dumps(row) + "\n")
    monkeypatch.setattr(benchmarks, "DATA_DIR", tmp_path)
    [p] = load_problems("toy", split="dev")
    assert p == Problem("t0", "2+3?", 5, "toy", {"family": "add", "difficulty": 1})
    assert load_problems("toy:dev") == [p]  # the split named in the source, as eval's --benchmarks takes it
    with pytest.raises(DataError, match="toy split 'test'"):
        load_problems("toy", split="test")
    with pytest.raises(ValueError, match="toy split must be one of"):
        load_problems("toy", split="validation")


def test_hf_dataset_ids_go_through_datasets(monkeypatch):
    datasets = pytest.importorskip("datasets")
    calls = []

    def fake_load(name, split):
        calls.append((name, split))
        return [{"problem": "q1", "solution": "\\boxed{1}"}]

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    [p] = load_problems("someone/some-set", split="train", answer_field="solution")
    assert calls == [("someone/some-set", "train")]
    assert (p.id, p.answer, p.benchmark) == ("someone/some-set-1", "\\boxed{1}", "someone/some-set")


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_a_worked_solution_without_an_answer_field_gives_its_boxed_answer_with_a_warning(tmp_path):
    rows = [
        {"problem": "1+1?", "solution": "Add them: $1+1=\\boxed{2}$."},
        {"problem": "Half of 3?", "solution": "First \\boxed{1}, no: it is $\\boxed{\\frac{3}{2}}$."},
        {"problem": "Pair?", "solution": "The pair is \\boxed{(1, 2)}."},
    ]
    path = _write_jsonl(tmp_path / "math.jsonl", rows)
    with pytest.warns(UserWarning, match=r"math: no answer field; .*\\boxed\{\} of its 'solution' field"):
        problems = load_problems(path)
    assert [p.answer for p in problems] == ["2", "\\frac{3}{2}", "(1, 2)"]  # the last box, never the solution
    assert [p.meta["solution"] for p in problems] == [r["solution"] for r in rows]  # kept for the grader's checks
    [explicit] = load_problems(path, answer_field="solution", limit=1)  # named by the user: taken as it is
    assert explicit.answer == rows[0]["solution"]


NO_BOX = r"no answer field, and the worked solution in field 'solution' has no \\boxed\{\} answer"


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"problem": "3?", "solution": "It is three."}, NO_BOX),
        ({"problem": "3?", "solution": 3}, NO_BOX),
        ({"problem": "3?", "steps": "\\boxed{3}"}, r"no answer field; looked for .*'solution'\]"),
    ],
)
def test_a_row_without_a_gold_is_refused_naming_line_and_field(tmp_path, bad, message):
    path = _write_jsonl(tmp_path / "m.jsonl", [{"problem": "1?", "solution": "\\boxed{1}"}, bad])
    with pytest.raises(DataError, match=rf"m\.jsonl:2: {message}.*--answer-field"):
        load_problems(path)


@pytest.mark.parametrize(
    "name, meant",
    [("gsm9k", "gsm8k"), ("GSM8K", "gsm8k"), ("math-500", "math500"), ("aime2024", "aime24"), ("amc_23", "amc23"),
     ("toyy", "toy"), ("olympiad_bench", "olympiadbench")],
)  # fmt: skip
def test_a_near_miss_of_a_shipped_name_is_an_error_before_any_hub_lookup(monkeypatch, name, meant):
    datasets = pytest.importorskip("datasets")

    def no_hub(*args, **kwargs):
        raise AssertionError("the Hub was tried")

    monkeypatch.setattr(datasets, "load_dataset", no_hub)
    with pytest.raises(DataError, match=rf"unknown benchmark '{name}': did you mean {meant}\?"):
        load_problems(name)


@pytest.mark.parametrize(
    "error", [ConnectionError("Couldn't reach 'x/y' on the Hub"), FileNotFoundError("Dataset 'x/y' doesn't exist"),
              ValueError("Unknown split 'test'. Should be one of ['train'].")],
)  # fmt: skip
def test_a_hub_failure_is_a_data_error_naming_the_source(monkeypatch, error):
    datasets = pytest.importorskip("datasets")

    def failing(*args, **kwargs):
        raise error

    monkeypatch.setattr(datasets, "load_dataset", failing)
    with pytest.raises(DataError, match=rf"'x/y' is not a shipped benchmark .* failed: {str(error)[:12]}"):
        load_problems("x/y")


@pytest.mark.parametrize(
    "text", ['[{"question": "a", "answer": "1"}, {"question": "b", "answer": "2"}]\n',
             '[\n  {"question": "a", "answer": "1"},\n  {"question": "b", "answer": "2"}\n]\n'],
)  # fmt: skip
def test_a_json_array_in_a_jsonl_file_gets_a_hint(tmp_path, text):
    path = tmp_path / "arr.jsonl"
    path.write_text(text)
    with pytest.raises(DataError, match=r"arr\.jsonl:1: .*JSON array: name it \.json, or write one object per line"):
        load_problems(str(path))
    fixed = tmp_path / "arr.json"
    fixed.write_text(text)
    assert [p.answer for p in load_problems(str(fixed))] == ["1", "2"]


@pytest.mark.parametrize(
    "line", ['{"question": "b", "answer": ', '{"question": "b", "answer": "2"', '{"question" "b"}']
)
def test_a_malformed_line_names_the_column_where_it_breaks(tmp_path, line):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"question": "a", "answer": "1"}\n' + line + "\n")
    # the parser stops at the first character it cannot use: the end of a cut line, or the missing ':' (column 13)
    column = 13 if line.startswith('{"question" "') else len(line) + 1
    with pytest.raises(DataError, match=rf"bad\.jsonl:2: not valid JSON \(.*, column {column}\)"):
        load_problems(str(path))
    as_json = tmp_path / "bad.json"
    as_json.write_text('[\n  {"question": "a", "answer": 1},\n  {"question" "b"}\n]')
    with pytest.raises(DataError, match=r"bad\.json:3:15: not valid JSON"):  # 2 spaces of indent + column 13
        load_problems(str(as_json))


@pytest.mark.parametrize(
    "row, message",
    [({"question": 5, "answer": "1"}, "the question field 'question' holds int 5"),
     ({"prompt": ["a"], "answer": "1"}, "the question field 'prompt' holds list"),
     ({"problem": "", "answer": "1"}, "empty question in field 'problem'"),
     ({"question": "a", "gold": None}, "empty answer in field 'gold'")],
)  # fmt: skip
def test_a_bad_value_names_its_field(tmp_path, row, message):
    path = _write_jsonl(tmp_path / "rows.jsonl", [row])
    with pytest.raises(DataError, match=rf"rows\.jsonl:1: {message}"):
        load_problems(path)
