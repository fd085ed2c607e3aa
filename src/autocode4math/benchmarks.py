"""Load math problems from anywhere into one record shape: `Problem(id, question, answer, benchmark, meta)`.

Sources, in the order `load_problems` tries them:
- one of the six shipped test sets (`BENCHMARKS`), under `data/benchmarks/` with their provenance note;
- `"toy"`, the synthetic world's splits under `data/toy/{split}.jsonl` (written by `toyworld`);
- a user's `.jsonl`, `.json` (a list of objects, or an object holding one) or `.parquet` file;
- anything else is taken as a Hugging Face dataset id and loaded through `datasets`.

Why one normaliser per shipped set: each set stores its gold differently (GSM8K ends a worked solution
with `#### N`, AMC stores 27.0 for 27, OlympiadBench keeps a list in `final_answer` plus unit and
multiple-answer flags). Normalising here means the grader sees one convention: the gold is a string,
or a list of strings when every one of several answers is required.

Deliberate strictness: a malformed line, a row without a question or an answer, or a duplicate id is an
error naming the file, the line and the field; nothing is silently skipped, because a silently shorter
test set is a wrong number in a paper. The one exception is loud: two GaoKao problems whose gold is empty
in the source cannot be graded, so the loader leaves them out with a warning that names them.
A file with a worked `solution` but no answer field (MATH's layout) gets the solution's last `\\boxed{}`
as its gold, with a warning; the whole solution is never taken as the gold (every correct answer would
then grade wrong). A name that is not shipped, not a file and close to a shipped name ("gsm8": did you
mean gsm8k?) is an error before any Hugging Face Hub lookup.
Simplification: user files are read whole into memory.
"""

from __future__ import annotations

import difflib
import json
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from autocode4math.config import ConfigError
from autocode4math.io import DataError, read_jsonl
from autocode4math.toyworld import SOURCES as TOY_WORLD

BENCHMARKS = ("gsm8k", "math500", "gaokao2023en", "olympiadbench", "aime24", "amc23")
DATA_DIR = Path(__file__).parent / "data"
TOY_SPLITS = ("train", "dev", "test")
TOY_SOURCES = tuple(TOY_WORLD)
"""The toy world's sources (toyworld.SOURCES): the main families, and the mid-reasoning family on its own."""

QUESTION_FIELDS = ("question", "problem", "prompt", "query", "input")
ANSWER_FIELDS = ("answer", "final_answer", "gold", "target", "expected_answer")
SOLUTION_FIELDS = ("solution",)
"""Worked solutions: without an answer field, the gold is their last \\boxed{} answer."""
ID_FIELDS = ("id", "idx", "unique_id", "problem_id", "uid")


@dataclass
class FieldNames:
    """Names of the fields of a user's benchmark file or Hub dataset; None: detected from common names."""

    question: str | None = None
    """The problem statement (detected: question, problem, prompt, query, input)."""
    answer: str | None = None
    """The gold answer (detected: answer, final_answer, gold, target, expected_answer; else a solution's box)."""
    id: str | None = None
    """A unique id per row (detected: id, idx, unique_id, problem_id, uid; else the row number)."""

    def as_kwargs(self) -> dict[str, str | None]:
        """The `load_problems` keyword arguments these names stand for."""
        return {"question_field": self.question, "answer_field": self.answer, "id_field": self.id}


@dataclass
class Problem:
    """One math problem in the normalised form every module consumes."""

    id: str
    """Unique within its benchmark; synthesised from the line number when the source has none."""
    question: str
    """The problem statement shown to the model."""
    answer: Any
    """The gold: a string, or a list of strings when all of several answers are required."""
    benchmark: str
    """The grading convention to use (a name in BENCHMARKS, "toy", or a user label)."""
    meta: dict = field(default_factory=dict)
    """Everything else the source carried (worked solution, subject, level, unit, ...)."""

    def __post_init__(self) -> None:
        if not isinstance(self.id, str) or not self.id:
            raise ValueError(f"Problem.id must be a non-empty string, got {self.id!r}")
        if not isinstance(self.question, str) or not self.question.strip():
            raise ValueError(f"Problem {self.id}: empty question")

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "question": self.question,
            "answer": self.answer,
            "benchmark": self.benchmark,
            "meta": self.meta,
        }


def _number_text(value: Any) -> str:
    """27.0 -> "27", 3.5 -> "3.5", "025" stays "025" (the grader treats it as 25)."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value).strip()


def _gsm8k_answer(solution: str) -> str:
    if "####" not in solution:
        raise ValueError("GSM8K answer has no '#### N' line")
    return solution.rsplit("####", 1)[1].strip().replace(",", "")


def _split_top_level(text: str, sep: str = ",") -> list[str]:
    """Split at `sep` outside brackets and drop `$` delimiters: '$(1,2), (3,4)$' -> ['(1,2)', '(3,4)']."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif ch == sep and depth <= 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return [p.strip().strip("$").strip() for p in parts if p.strip().strip("$").strip()]


def _olympiad_answer(row: dict[str, Any]) -> list[str] | str:
    answers = [str(a) for a in (row.get("final_answer") or [])]
    if not answers:
        raise ValueError("OlympiadBench row has an empty final_answer")
    if row.get("is_multiple_answer") and len(answers) == 1:
        answers = _split_top_level(answers[0].replace("$,$", "$, $"))
    return answers[0] if len(answers) == 1 else answers


def _shipped_record(name: str, row: dict[str, Any]) -> tuple[str, Any, dict[str, Any]]:
    """(question, answer, meta) for one row of a shipped set; the meta keeps every other field."""
    question = row.get("question") or row.get("problem")
    if name == "gsm8k":
        answer: Any = _gsm8k_answer(row["answer"])
        meta = {"solution": row["answer"]}
    elif name == "olympiadbench":
        answer = _olympiad_answer(row)
        if row.get("context"):
            question = f"{row['context']}\n\n{question}"
        meta = {k: row.get(k) for k in ("solution", "unit", "is_multiple_answer", "answer_type", "subfield", "error")}
    else:
        answer = _number_text(row["answer"]) if name in ("aime24", "amc23") else row["answer"]
        skip = {"question", "problem", "answer", "id", "idx"}
        meta = {k: v for k, v in row.items() if k not in skip}
    return question, answer, meta


def _detect(row: dict[str, Any], given: str | None, candidates: tuple[str, ...], what: str, where: str) -> str | None:
    if given is not None:
        if given not in row:
            raise DataError(f"{where}: no field {given!r} (given as the {what} field); the row has {sorted(row)}")
        return given
    found = next((c for c in candidates if c in row), None)
    if found is None and what == "question":
        raise DataError(
            f"{where}: no question field; looked for {list(candidates)}, found {sorted(row)}; "
            "name it with --question-field (fields.question)"
        )
    return found


def _rows_of_file(path: Path) -> list[tuple[str, dict[str, Any]]]:
    """(location, row) pairs; the location names the file and the line (or the index) for errors."""
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return _jsonl_rows(path)
    if suffix == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno}:{e.colno}: not valid JSON ({e.msg})") from None
        if isinstance(data, dict):
            lists = [v for v in data.values() if isinstance(v, list)]
            if len(lists) != 1:
                raise DataError(f"{path}: expected a list of objects or an object holding exactly one list")
            data = lists[0]
        if not isinstance(data, list):
            raise DataError(f"{path}: expected a JSON list of objects, got {type(data).__name__}")
        return [(f"{path}[{i}]", _as_dict(r, f"{path}[{i}]")) for i, r in enumerate(data)]
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        return [(f"{path} row {i}", r) for i, r in enumerate(pq.read_table(path).to_pylist())]
    raise DataError(f"{path}: unsupported file type {suffix!r}; use .jsonl, .json or .parquet")


def _jsonl_rows(path: Path) -> list[tuple[str, dict[str, Any]]]:
    with path.open(encoding="utf-8") as f:
        lines = [(i, line) for i, line in enumerate(f, start=1) if line.strip()]
    try:
        return [(f"{path}:{lineno}", row) for (lineno, _), row in zip(lines, read_jsonl(path), strict=True)]
    except DataError as e:
        if lines and lines[0][1].lstrip().startswith("["):
            raise DataError(f"{e} (the file holds a JSON array: name it .json, or write one object per line)") from None
        raise


def _as_dict(row: Any, where: str) -> dict[str, Any]:
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
    return row


def _hf_rows(source: str, split: str) -> list[tuple[str, dict[str, Any]]]:
    """Rows of a Hugging Face dataset, after checking that `source` is not a near miss of a shipped name."""
    close = difflib.get_close_matches(source.lower(), [*BENCHMARKS, "toy"], n=1, cutoff=0.75)
    if close:
        raise DataError(
            f"unknown benchmark {source!r}: did you mean {close[0]}? (shipped: {', '.join(BENCHMARKS)}, toy; "
            "or a .jsonl/.json/.parquet file, or a Hugging Face dataset id)"
        )
    try:
        import datasets
    except ImportError:
        raise DataError(
            f"{source!r} is not a shipped benchmark ({', '.join(BENCHMARKS)}, toy) or a file; loading it as a "
            "Hugging Face dataset needs `pip install autocode4math[data]`"
        ) from None
    try:
        ds = datasets.load_dataset(source, split=split)
    except (OSError, ValueError) as e:
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise DataError(
            f"{source!r} is not a shipped benchmark ({', '.join(BENCHMARKS)}, toy) or a local file, and loading it "
            f"as a Hugging Face dataset failed: {reason}"
        ) from None
    return [(f"{source}[{split}] row {i}", dict(r)) for i, r in enumerate(ds)]


def _finish(records: list[Problem], benchmark: str, limit: int | None) -> list[Problem]:
    seen: set[str] = set()
    for p in records:
        if p.id in seen:
            raise DataError(f"{benchmark}: duplicate id {p.id!r}; give an id field whose values are unique")
        seen.add(p.id)
    return records if limit is None else records[:limit]


def _load_shipped(name: str, limit: int | None) -> list[Problem]:
    path = DATA_DIR / "benchmarks" / name / "test.jsonl"
    records, ungradable = [], []
    for i, (where, row) in enumerate(_rows_of_file(path), start=1):
        try:
            question, answer, meta = _shipped_record(name, row)
            raw_id = row.get("id", row.get("idx"))
            problem = Problem(str(raw_id) if raw_id is not None else f"{name}-{i}", question, answer, name, meta)
        except (KeyError, ValueError) as e:
            raise DataError(f"{where}: {e}") from None
        (ungradable if isinstance(answer, str) and not answer.strip("$ ") else records).append(problem)
    if ungradable:
        warnings.warn(
            f"{name}: left out {len(ungradable)} problem(s) whose gold is empty in the source file: "
            f"{[p.id for p in ungradable]}",
            stacklevel=3,
        )
    return _finish(records, name, limit)


def _load_toy(source: str, split: str, limit: int | None) -> list[Problem]:
    if split not in TOY_SPLITS:
        raise ConfigError(f"toy split must be one of {TOY_SPLITS}, got {split!r}")
    path = DATA_DIR / source / f"{split}.jsonl"
    if not path.exists():
        raise DataError(
            f"{source} split {split!r} not found at {path}; generate it with `autocode toy data --source {source}`"
        )
    return load_problems(str(path), benchmark=source, limit=limit)


def load_problems(
    source: str,
    *,
    split: str = "test",
    question_field: str | None = None,
    answer_field: str | None = None,
    id_field: str | None = None,
    benchmark: str | None = None,
    limit: int | None = None,
) -> list[Problem]:
    """Load problems as `Problem` records.

    `source` is a shipped benchmark name, "toy" or "toy-mid" (with `split` train/dev/test; "toy:dev" names
    the split), a .jsonl/.json/.parquet path, or a Hugging Face dataset id (loaded with `split`). For
    files and datasets the question, answer and id fields are detected from common names unless
    given; `benchmark` names the grading convention (defaults to the file stem). Rows already in the
    normalised form keep their `meta`.
    """
    if limit is not None and limit < 0:
        raise ConfigError(f"limit must be >= 0, got {limit}")
    if source in BENCHMARKS:
        return _load_shipped(source, limit)
    name, _, named_split = source.partition(":")
    if name in TOY_SOURCES:
        return _load_toy(name, named_split or split, limit)
    path = Path(source)
    if path.suffix.lower() in (".jsonl", ".json", ".parquet") or path.exists():
        if not path.exists():
            raise DataError(f"{path}: no such file")
        rows, label = _rows_of_file(path), benchmark or path.stem
    else:
        rows, label = _hf_rows(source, split), benchmark or source
    return _finish(_user_records(rows, label, question_field, answer_field, id_field), label, limit)


def _user_records(
    rows: list[tuple[str, dict[str, Any]]],
    benchmark: str,
    question_field: str | None,
    answer_field: str | None,
    id_field: str | None,
) -> list[Problem]:
    records, boxed_from = [], None
    for i, (where, row) in enumerate(rows, start=1):
        q_key = _detect(row, question_field, QUESTION_FIELDS, "question", where)
        a_key = _detect(row, answer_field, ANSWER_FIELDS, "answer", where)
        i_key = _detect(row, id_field, ID_FIELDS, "id", where)
        question = row[q_key]
        if not isinstance(question, str):
            raise DataError(f"{where}: the question field {q_key!r} holds {type(question).__name__} {question!r}")
        if not question.strip():
            raise DataError(f"{where}: empty question in field {q_key!r}")
        if a_key is None:
            boxed_from, answer = _boxed_gold(row, where)
        else:
            answer = row[a_key]
        if answer is None or (isinstance(answer, str) and not answer.strip()):
            raise DataError(f"{where}: empty answer in field {a_key!r}")
        meta = row.get("meta") if isinstance(row.get("meta"), dict) else {}
        meta = {**meta, **{k: v for k, v in row.items() if k not in (q_key, a_key, i_key, "meta", "benchmark")}}
        pid = str(row[i_key]) if i_key is not None and row[i_key] is not None else f"{benchmark}-{i}"
        try:
            records.append(Problem(pid, question, answer, benchmark, meta))
        except ValueError as e:
            raise DataError(f"{where}: {e} (id field {i_key!r})") from None
    if boxed_from:
        warnings.warn(
            f"{benchmark}: no answer field; the gold of each question is the last \\boxed{{}} of its {boxed_from!r} "
            "field (name another with --answer-field)",
            stacklevel=3,
        )
    return records


def _boxed_gold(row: dict[str, Any], where: str) -> tuple[str, str]:
    """(field, gold) from a worked solution's last \\boxed{}, for rows without an answer field."""
    from autocode4math.grading import last_boxed

    key = next((f for f in SOLUTION_FIELDS if f in row), None)
    if key is None:
        raise DataError(
            f"{where}: no answer field; looked for {list(ANSWER_FIELDS + SOLUTION_FIELDS)}, found {sorted(row)}; "
            "name it with --answer-field (fields.answer)"
        )
    gold = last_boxed(row[key]) if isinstance(row[key], str) else None
    if gold is None:
        raise DataError(
            f"{where}: no answer field, and the worked solution in field {key!r} has no \\boxed{{}} answer to take "
            "as the gold; name the answer field with --answer-field (fields.answer)"
        )
    return key, gold


# Responses built from the data itself, for the grader's self-checks and throughput figures.


def worked_solutions(problem: Problem) -> list[str]:
    """The worked solutions of a problem that state their final answer in a gradable way.

    OlympiadBench's solutions are proofs that mark no final answer, so they are not used.
    """
    if problem.benchmark == "olympiadbench":
        return []
    solution = problem.meta.get("solution")
    return [s for s in (solution if isinstance(solution, list) else [solution]) if isinstance(s, str) and s.strip()]


def reference_response(problem: Problem) -> str:
    """A response that states the gold itself: "The answer is \\boxed{gold}" (several answers comma-joined)."""
    golds = problem.answer if isinstance(problem.answer, list) else [problem.answer]
    return "The answer is $\\boxed{" + ", ".join(str(g).strip().strip("$") for g in golds) + "}$."


def shifted_pairs(problems: Sequence[Problem]) -> list[tuple[str, Any, str | None]]:
    """(response of problem i, gold of problem i+1, benchmark): every one should be graded wrong.

    The response is the first worked solution where there is one, else the reference response.
    """
    items = []
    for i, problem in enumerate(problems):
        other = problems[(i + 1) % len(problems)]
        solutions = worked_solutions(problem)
        items.append((solutions[0] if solutions else reference_response(problem), other.answer, other.benchmark))
    return items
