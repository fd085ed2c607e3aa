"""Answer extraction and equivalence: one grader for evaluation numbers and for training rewards.

Why this module exists: a grading error is a wrong reward in training and a wrong number in a paper.
It builds on math-verify (sympy-based equivalence) and puts adapters on both sides of it:

- Extraction (`extract_answer`): the last `\\boxed{}` (or `\\fbox{}`) written outside fenced code and
  output blocks, then an explicit "the answer is"; otherwise no answer, which is wrong. Only GSM8K, whose
  convention ends solutions with `#### N`, also takes that line and then the last number.
- Normalisation (`normalize`): `$`, `\\left`/`\\right`, `\\dfrac`, degree signs, `\\%` and spacing are
  dropped; a unit is dropped only when it is a known unit word after a plain number, so a single
  letter is never eaten as a unit ("5 m" stays 5*m). There is no percent x100 rule: "50\\%" equals 50,
  not 0.5 (math-verify alone accepts 0.5).
- Fast paths that cannot create a false positive: identical normalised strings; two plain numbers
  (integers, decimals, `a/b`, `\\frac{a}{b}`, thousands separators) compared exactly as fractions.
- Integer benchmarks (AIME, AMC, toy): the prediction must equal the integer exactly; "025" is 25,
  27.0 is 27, 3159.3 is not 3159 (no float rounding).
- Several answers (a list gold, or a gold joined by "or"): the prediction is split at top-level commas,
  semicolons, "and"/"or", and the parts must match the gold parts one to one, in any order.
- Everything else goes to math-verify with its unit stripping off and its own signal-based timeouts off:
  those only work in a main thread. `GradingPool` grades in worker processes instead and kills a worker
  that exceeds the hard per-item timeout.
- A grader failure is never silently "wrong": each Grade carries a `status`, `ok`, `timeout` (the
  hard timeout passed) or `error` (the grader raised, or its worker died; the message in `error`).
  Such items are not correct, and callers count and report them (rollout records, summaries, alarms).
- An equation is not its right-hand side: against a gold without "=", a prediction with "=" counts only
  when its left side is a plain name (`x=5`, `f(x)=2x`); math-verify alone accepts `x-3=0` for 0.
- GaoKao's set-builder intervals (`\\{x|-2\\leq x<1\\}`) are rewritten as intervals (`[-2,1)`).

Deliberately simplified: text answers compare as case-folded words; single letters are case-folded by
latex2sympy (X equals x); a chain "a=b=16" stated as the answer is wrong against 16; matrices and
inequalities are left to math-verify as they are. See docs/grading.md for the rules and their tests.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import os
import re
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

INTEGER_BENCHMARKS = ("aime24", "amc23", "toy")
"""Benchmarks whose answers are exact integers."""
LAST_NUMBER_BENCHMARKS = ("gsm8k",)
"""Benchmarks whose convention allows `#### N` and, failing all else, the last number in the text."""


GRADE_STATUSES = ("ok", "timeout", "error")


@dataclass
class Grade:
    """The verdict on one response."""

    pred: str | None
    """The extracted answer, or None when the response gave none."""
    correct: bool
    """Whether `pred` is equivalent to the gold (False when grading failed)."""
    status: str = "ok"
    """`ok`, `timeout` (did not finish within the hard timeout) or `error` (the grader failed)."""
    error: str = field(default="", compare=False)
    """Why grading failed ("" when ok)."""

    @property
    def timed_out(self) -> bool:
        return self.status == "timeout"

    def to_dict(self) -> dict[str, Any]:
        return {"pred": self.pred, "correct": self.correct, "grade_status": self.status, "grade_error": self.error}


def _failure(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"[:500]


# ---------------------------------------------------------------- extraction

_FENCE = re.compile(r"```.*?(?:```|\Z)", re.S)
_BOX = re.compile(r"\\(?:boxed|fbox|framebox)\s*")
_ANSWER_IS = re.compile(r"(?:final answer|the answer)\s*(?:is|:)\s*:?\s*", re.I)
_NUMBER_IN_TEXT = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")


def _braced(text: str, start: int) -> str | None:
    """The content of the `{...}` group opening at `start`, or None when it never closes."""
    depth = 0
    for i in range(start, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return text[start + 1 : i]
    return None


def last_boxed(text: str) -> str | None:
    """The content of the last `\\boxed{}` (or `\\fbox{}`) in `text`, or None."""
    for match in reversed(list(_BOX.finditer(text))):
        end = match.end()
        if end < len(text) and text[end] == "{":
            content = _braced(text, end)
        else:  # "\boxed 5": the argument is the next token
            content = (re.match(r"[^\s$.,]+", text[end:]) or [None])[0]
        if content is not None and content.strip():
            return content.strip()
    return None


def _after_answer_is(text: str) -> str | None:
    matches = list(_ANSWER_IS.finditer(text))
    if not matches:
        return None
    rest = text[matches[-1].end() :].lstrip()
    if rest.startswith("$"):
        close = rest.find("$", 1)
        return rest[1:close].strip() or None if close > 0 else None
    line = re.split(r"\n|\.(?:\s|$)|,\s+(?=[A-Za-z])", rest, maxsplit=1)[0]
    return line.strip().rstrip(".").strip() or None


def extract_answer(response: str, benchmark: str | None = None) -> str | None:
    """The answer a response commits to: last box outside code/output blocks, then "the answer is".

    GSM8K alone also accepts `#### N` and then the last number, as its convention calls for.
    """
    text = _FENCE.sub(" ", response)
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed
    if benchmark in LAST_NUMBER_BENCHMARKS and "####" in text:
        tail = text.rsplit("####", 1)[1].strip().split("\n")[0].strip()
        if tail:
            return tail
    stated = _after_answer_is(text)
    if stated is not None:
        return stated
    if benchmark in LAST_NUMBER_BENCHMARKS:
        numbers = _NUMBER_IN_TEXT.findall(text)
        return numbers[-1].rstrip(",") if numbers else None
    return None


# ---------------------------------------------------------------- normalisation

_UNIT_WORDS = (
    "cm|mm|km|kg|mg|ml|meters?|metres?|centimeters?|kilometers?|inches|inch|feet|foot|ft|miles?|yards?|"
    "seconds?|sec|minutes?|mins?|hours?|hrs?|days?|weeks?|months?|years?|degrees?|dollars?|cents?|units?|"
    "square|sq|cubic|km/h|mph|m/s|grams?|pounds?|lbs?|liters?|litres?|gallons?|points?|people|students?"
)
_UNIT_TAIL = re.compile(
    rf"(?:\\(?:text|mbox|mathrm)\{{\s*(?:{_UNIT_WORDS})(?:[\s^{{}}0-9/]|{_UNIT_WORDS})*\}}"
    rf"|\s+(?:{_UNIT_WORDS})\b(?:[\s^{{}}0-9/]|{_UNIT_WORDS})*)$",
    re.I,
)
_PLAIN_NUMBER = re.compile(r"[+-]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d*)?|[+-]?\.\d+")
_FRACTION = re.compile(r"([+-]?)(?:\\frac\{([+-]?\d+)\}\{(\d+)\}|\\frac(\d)(\d)|(\d+)/(\d+))")
_ASSIGNMENT = re.compile(r"[A-Za-z](?:_\{?\w+\}?)?(?:\([\w,]*\))?=(?!=)")
_REPLACEMENTS = (
    (r"\\[dt]frac", r"\\frac"),
    (r"\\left\b|\\right\b|\\displaystyle|\\!|\\,|\\;|\\:|\\ |~", " "),
    (r"\^\s*\{?\\circ\}?|°|\\degree", ""),
    (r"\\%|%", ""),
    (r"\\(?:text|textbf|mathrm|mbox)\{\s*\}", ""),
)


def _unwrap(s: str, commands: tuple[str, ...]) -> str:
    """Drop a command that wraps the whole string, and only then: "\\textbf{(113)}" -> "(113)"."""
    match = re.match(rf"\\({'|'.join(commands)})\s*\{{", s)
    if match and _braced(s, match.end() - 1) == s[match.end() : -1]:
        return _unwrap(s[match.end() : -1].strip(), commands)
    return s


def normalize(answer: str) -> str:
    """A canonical string for comparison; conservative, so equal strings mean equal answers."""
    s = answer.strip()
    s = re.sub(r"^\\\(|\\\)$|^\\\[|\\\]$", "", s).strip()
    s = s.strip("$").strip()
    for pattern, repl in _REPLACEMENTS:
        s = re.sub(pattern, repl, s)
    s = _unwrap(s.strip().rstrip(".").strip(), ("textbf", "mathbf", "boxed"))
    unit = _UNIT_TAIL.search(s)
    if unit and _as_fraction(s[: unit.start()].strip()) is not None:
        s = s[: unit.start()]
    s = re.sub(r"(\\[A-Za-z]+)\s+(?=[A-Za-z])", "\\1\0", s)  # "\\leq x" keeps its space, "1 + 2" does not
    return _set_builder_as_interval(re.sub(r"\s+", "", s).replace("\0", " "))


_LESS = r"(<|\\leqslant|\\leq|\\le)"
_MORE = r"(>|\\geqslant|\\geq|\\ge)"


def _set_builder_as_interval(s: str) -> str:
    """GaoKao writes intervals as sets: "\\{x|-2\\leq x<1\\}" -> "[-2,1)"; other strings are returned as they are."""
    match = re.fullmatch(r"\\\{([A-Za-z])\s?(?:\||\\mid|:)(.+)\\\}", s)
    if match is None:
        return s
    var, body = match.group(1), match.group(2).replace(" ", "")
    two_sided = re.fullmatch(rf"(.+?){_LESS}{var}{_LESS}(.+)", body)
    if two_sided:
        low, op_low, op_high, high = two_sided.groups()
        return ("(" if op_low == "<" else "[") + f"{low},{high}" + (")" if op_high == "<" else "]")
    upper = re.fullmatch(rf"{var}{_LESS}(.+)", body)
    if upper:
        return "(-\\infty," + upper.group(2) + (")" if upper.group(1) == "<" else "]")
    lower = re.fullmatch(rf"{var}{_MORE}(.+)", body)
    if lower:
        return ("(" if lower.group(1) == ">" else "[") + lower.group(2) + ",\\infty)"
    return s


def _as_fraction(s: str) -> Fraction | None:
    """An exact value for a plain number ("1,234", "025", "-3.50", "7/2", "\\frac{7}{2}"), else None."""
    if _PLAIN_NUMBER.fullmatch(s):
        return Fraction(s.replace(",", ""))
    match = _FRACTION.fullmatch(s)
    if match is None:
        return None
    sign, *groups = match.groups()
    num, den = [g for g in groups if g is not None]
    if int(den) == 0:
        return None
    value = Fraction(int(num), int(den))
    return -value if sign == "-" else value


def _gold_parts(gold: Any, benchmark: str | None) -> list[str]:
    """The gold as one or more answers that must all be given; raises on an empty gold."""
    if isinstance(gold, bool) or gold is None:
        raise ValueError(f"gold answer must be a string, a number or a list, got {gold!r}")
    if isinstance(gold, list | tuple):
        parts = [p for g in gold for p in _gold_parts(g, benchmark)]
    elif isinstance(gold, float) and gold.is_integer():
        parts = [str(int(gold))]
    else:
        text = str(gold)
        if benchmark in LAST_NUMBER_BENCHMARKS and "####" in text:
            text = text.rsplit("####", 1)[1]
        parts = [p for p in re.split(r"\s+or\s+|\\(?:text|mbox)\{\s*or\s*\}|\\quad\s*or\s*\\quad", text) if p.strip()]
    if not parts or not all(normalize(p) for p in parts):
        raise ValueError(f"empty gold answer: {gold!r}")
    return parts


def _pred_parts(pred: str) -> list[str]:
    s = re.sub(r"\s+(?:or|and)\s+|\\(?:text|mbox)\{\s*(?:or|and)\s*\}|\\quad", ";", pred)
    s = normalize(s)
    if s.startswith(r"\{") and s.endswith(r"\}"):
        s = s[2:-2]
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(s):
        depth += ch in "([{"
        depth -= ch in ")]}"
        if ch in ",;" and depth <= 0:
            parts.append(s[start:i])
            start = i + 1
    parts.append(s[start:])
    return [p for p in parts if p]


# ---------------------------------------------------------------- equivalence


def quick_verdict(pred: str, gold: str, benchmark: str | None = None) -> bool | None:
    """True/False when cheap exact checks decide; None when sympy-level verification is needed."""
    p, g = normalize(pred), normalize(gold)
    if p == g or p.casefold() == g.casefold() and re.fullmatch(r"(?:\\text\{)?\(?[A-Za-z]{2,}\)?\}?", g):
        return True
    if benchmark in INTEGER_BENCHMARKS:  # "n=25" and an answer-choice style "(25)" both state 25
        p = re.sub(r"^[A-Za-z]\w*=|^\((\d+)\)$", r"\1", p)
    pv, gv = _as_fraction(p), _as_fraction(g)
    if pv is not None and gv is not None:
        return pv == gv
    if benchmark in INTEGER_BENCHMARKS and gv is not None and pv is None and re.fullmatch(r"[\d.,+\-\s]*", p):
        return False
    return None


@functools.lru_cache(maxsize=4096)
def _parsed(text: str) -> tuple:
    """math-verify's parse of one normalised answer, cached: the same gold is graded many times."""
    import logging

    from latex2sympy2_extended import NormalizationConfig
    from math_verify import LatexExtractionConfig, parse

    # its "timeout disabled" warning does not apply: GradingPool enforces the timeout per process
    logging.getLogger("math_verify").setLevel(logging.ERROR)

    config = LatexExtractionConfig(
        boxed_match_priority=0,
        normalization_config=NormalizationConfig(
            basic_latex=True, units=False, malformed_operators=True, nits=True, boxed="all", equations=False
        ),
    )
    return tuple(parse("\\boxed{" + text + "}", [config], parsing_timeout=None))


def _verify_one(pred: str, gold: str, benchmark: str | None) -> bool:
    quick = quick_verdict(pred, gold, benchmark)
    if quick is not None:
        return quick
    import sympy
    from math_verify import verify

    p, g = normalize(pred), normalize(gold)
    if "=" in p and "=" not in g:  # "x-3=0" must not reduce to its right side 0; "x=3" and "f(x)=2x" may
        named = _ASSIGNMENT.match(p)
        if named is None:
            return False
        p = p[named.end() :]
    shapes = {_shape(p), _shape(g)}
    if None not in shapes and len(shapes) == 2:  # a set is not a tuple or an interval: {1,2} vs (1,2)
        return False
    parsed_pred, parsed_gold = _parsed(p), _parsed(g)
    if not parsed_pred or not parsed_gold:
        return False
    if benchmark in INTEGER_BENCHMARKS and _as_fraction(g) is not None:
        value = parsed_pred[0]
        value = value.rhs if isinstance(value, sympy.Eq) else value
        return isinstance(value, sympy.Basic) and value.is_number and value == sympy.Rational(_as_fraction(g))
    return bool(verify(list(parsed_gold), list(parsed_pred), timeout_seconds=None))


def _shape(s: str) -> str | None:
    if s.startswith("\\{") and s.endswith("\\}"):
        return "set"
    return "sequence" if s[:1] in "([" and s[-1:] in ")]" and "," in s else None


def _match_all(preds: list[str], golds: list[str], benchmark: str | None) -> bool:
    """One-to-one matching of predicted parts to gold parts, in any order (small n: backtracking)."""
    if len(preds) != len(golds):
        return False
    ok = [[_verify_one(p, g, benchmark) for p in preds] for g in golds]

    def assign(i: int, used: frozenset[int]) -> bool:
        return i == len(golds) or any(
            ok[i][j] and assign(i + 1, used | {j}) for j in range(len(preds)) if j not in used
        )

    return assign(0, frozenset())


def is_equivalent(pred: str, gold: Any, benchmark: str | None = None) -> bool:
    """Whether the extracted answer `pred` matches `gold` (a string, a number, or a list of required answers)."""
    golds = _gold_parts(gold, benchmark)
    if len(golds) == 1:
        return _verify_one(pred, golds[0], benchmark)
    return _match_all(_pred_parts(pred), golds, benchmark)


def grade(response: str, gold: Any, benchmark: str | None = None) -> Grade:
    """Extract and judge one response in this process (no timeout: use `grade_many` for that)."""
    golds = _gold_parts(gold, benchmark)
    pred = extract_answer(response, benchmark)
    if pred is None:
        return Grade(None, False)
    try:
        correct = is_equivalent(pred, golds if len(golds) > 1 else golds[0], benchmark)
    except Exception as e:  # a grader failure on odd input is recorded, never a crashed batch
        return Grade(pred, False, "error", _failure(e))
    return Grade(pred, correct)


def _settle(pred: str, gold: Any, benchmark: str | None) -> bool | None:
    """The cheap verdict the parent can give without a worker, or None."""
    golds = _gold_parts(gold, benchmark)
    return quick_verdict(pred, golds[0], benchmark) if len(golds) == 1 else None


# ---------------------------------------------------------------- parallel grading with a hard timeout


def _worker_main(conn: Any) -> None:
    """Worker loop: warm up, say "ready", then answer chunks of (index, pred, gold, benchmark) per item."""
    _verify_one("\\sqrt{2}", "\\frac{2}{\\sqrt{2}}", None)  # import sympy and math-verify before any clock runs
    conn.send("ready")
    while True:
        chunk = conn.recv()
        if chunk is None:
            return
        for index, pred, gold, benchmark in chunk:
            try:
                conn.send((index, is_equivalent(pred, gold, benchmark), ""))
            except Exception as e:
                conn.send((index, False, _failure(e)))


class _Worker:
    """One grading process and the items it still owes, oldest first."""

    def __init__(self, context: Any) -> None:
        self.conn, child = context.Pipe()
        self.process = context.Process(target=_worker_main, args=(child,), daemon=True)
        self.process.start()
        child.close()
        self.owed: deque[int] = deque()
        self.since = 0.0

    def wait_ready(self, timeout_s: float = 120.0) -> None:
        """Block until the worker has imported its libraries, so start-up never counts against an item."""
        try:
            if self.conn.poll(timeout_s) and self.conn.recv() == "ready":
                return
        except (EOFError, OSError):
            pass
        self.kill()
        raise RuntimeError(
            "a grading worker failed to start (in a script, is the pool used under `if __name__ == '__main__':`?)"
        )

    def give(self, chunk: list[tuple[int, str, Any, str | None]]) -> None:
        self.owed.extend(item[0] for item in chunk)
        self.since = time.monotonic()
        with contextlib.suppress(OSError):  # a dead worker shows up as EOF in the wait loop and is replaced
            self.conn.send(chunk)

    def kill(self) -> None:
        self.process.kill()
        self.process.join(timeout=5)
        self.conn.close()


class GradingPool:
    """A warm pool of grading processes; `grade_many` is parallel, in order, with a hard per-item timeout.

    Workers are started with "spawn", so a script that uses the pool needs the usual
    `if __name__ == "__main__":` guard. Workers start on first need and stay up between calls
    (sympy import and math-verify's caches are paid once). A worker that runs past the timeout on an
    item is killed and replaced; that item gets status `timeout` (a worker that dies: `error`) and the
    rest of its chunk is graded again elsewhere.
    """

    def __init__(self, workers: int | None = None, chunk_size: int = 8) -> None:
        if workers is not None and workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        import multiprocessing

        self.n_workers = workers or max(1, (os.cpu_count() or 2) - 1)
        self.chunk_size = chunk_size
        self._context = multiprocessing.get_context("spawn")  # safe beside torch/CUDA in the parent
        self._workers: list[_Worker] = []

    def __enter__(self) -> GradingPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for worker in self._workers:
            with contextlib.suppress(OSError):
                worker.conn.send(None)
            worker.process.join(timeout=2)
            if worker.process.is_alive():
                worker.kill()
        self._workers = []

    def grade_many(self, items: Sequence[tuple[str, Any, str | None]], timeout_s: float = 10.0) -> list[Grade]:
        """Grade (response, gold, benchmark) items; results in input order."""
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        grades: list[Grade | None] = [None] * len(items)
        todo = []
        for i, (response, gold, benchmark) in enumerate(items):
            try:
                _gold_parts(gold, benchmark)
            except ValueError as e:
                raise ValueError(f"item {i}: {e}") from None
            pred = extract_answer(response, benchmark)
            verdict = None if pred is None else _settle(pred, gold, benchmark)
            if pred is None or verdict is not None:
                grades[i] = Grade(pred, bool(verdict))
            else:
                todo.append((i, pred, gold, benchmark))
        if todo:
            self._run(todo, grades, timeout_s)
        return grades  # type: ignore[return-value]

    def _run(self, todo: list, grades: list[Grade | None], timeout_s: float) -> None:
        from multiprocessing.connection import wait

        new = [_Worker(self._context) for _ in range(min(self.n_workers, len(todo)) - len(self._workers))]
        self._workers.extend(new)
        for worker in new:
            worker.wait_ready()
        by_index = {item[0]: item for item in todo}
        queue = deque(todo[i : i + self.chunk_size] for i in range(0, len(todo), self.chunk_size))
        while queue or any(w.owed for w in self._workers):
            for worker in self._workers:
                if not worker.owed and queue:
                    worker.give(queue.popleft())
            busy = [w for w in self._workers if w.owed]
            deadline = min(w.since for w in busy) + timeout_s
            ready = wait([w.conn for w in busy], timeout=max(0.0, deadline - time.monotonic()))
            for worker in busy:
                if worker.conn in ready:
                    self._collect(worker, grades, by_index, queue)
                elif time.monotonic() - worker.since > timeout_s:
                    self._replace(worker, grades, by_index, queue, "timeout", f"took longer than {timeout_s:g} s")

    def _collect(self, worker: _Worker, grades: list, by_index: dict, queue: deque) -> None:
        try:
            while worker.conn.poll():
                index, correct, error = worker.conn.recv()
                pred = by_index[index][1]
                grades[index] = Grade(pred, correct, "error", error) if error else Grade(pred, correct)
                worker.owed.popleft()
                worker.since = time.monotonic()
        except (EOFError, OSError):  # the worker died (e.g. out of memory): its current item failed
            worker.process.join(timeout=1)
            died = f"the grading worker died (exit code {worker.process.exitcode})"
            self._replace(worker, grades, by_index, queue, "error", died)

    def _replace(self, worker: _Worker, grades: list, by_index: dict, queue: deque, status: str, why: str) -> None:
        """Fail the worker's current item with `status`, requeue the rest of its chunk, start a fresh worker."""
        stuck = worker.owed.popleft()
        grades[stuck] = Grade(by_index[stuck][1], False, status, why)
        if worker.owed:
            queue.appendleft([by_index[i] for i in worker.owed])
        worker.kill()
        fresh = _Worker(self._context)
        fresh.wait_ready()
        self._workers[self._workers.index(worker)] = fresh


@functools.lru_cache(maxsize=8)
def shared_pool(workers: int | None = None) -> GradingPool:
    """The process-wide warm pool behind `grade_many` (one per worker count), closed at exit."""
    pool = GradingPool(workers)
    atexit.register(pool.close)
    return pool


def grade_many(
    items: Sequence[tuple[str, Any, str | None]], workers: int | None = None, timeout_s: float = 10.0
) -> list[Grade]:
    """Grade many (response, gold, benchmark) items in worker processes with a hard per-item timeout."""
    return shared_pool(workers).grade_many(items, timeout_s=timeout_s)


def grade_file(
    in_path: str, out_path: str, benchmark: str | None = None, workers: int | None = None, timeout_s: float = 10.0
) -> dict[str, Any]:
    """`autocode grade`: rows with `response` and `answer` (and optionally `benchmark`) -> rows plus `pred`, `correct`.

    Output rows keep the input order; `grade_status` (and `grade_error`) are added only where grading failed
    (`timeout` or `error`). Returns a summary.
    """
    from autocode4math.benchmarks import _rows_of_file
    from autocode4math.io import DataError, write_jsonl

    located = _rows_of_file(Path(in_path))
    items = []
    for where, row in located:
        missing = [k for k in ("response", "answer") if k not in row]
        if missing or not isinstance(row["response"], str):
            raise DataError(f"{where}: need a string 'response' and an 'answer' (missing: {missing or ['response']})")
        items.append((row["response"], row["answer"], row.get("benchmark") or benchmark))
    try:
        with GradingPool(workers) as pool:
            grades = pool.grade_many(items, timeout_s=timeout_s)
    except ValueError as e:  # "item i: empty gold ..." -> the file and line of item i
        index = re.match(r"item (\d+): ", str(e))
        raise DataError(f"{located[int(index.group(1))][0]}: {str(e)[index.end() :]}" if index else str(e)) from None
    rows = []
    for (_, row), g in zip(located, grades, strict=True):
        failed = {"grade_status": g.status, "grade_error": g.error} if g.status != "ok" else {}
        rows.append({**row, "pred": g.pred, "correct": g.correct, **failed})
    write_jsonl(out_path, rows)
    n = len(rows)
    return {
        "graded": n,
        "correct": sum(g.correct for g in grades),
        "accuracy": sum(g.correct for g in grades) / max(n, 1),
        "no_answer": sum(g.pred is None for g in grades),
        "timed_out": sum(g.status == "timeout" for g in grades),
        "errors": sum(g.status == "error" for g in grades),
    }


# ---------------------------------------------------------------- throughput


def bench_grading(workers: int | None = None, timeout_s: float = 10.0) -> dict[str, float]:
    """Pairs per second of `GradingPool.grade_many` on MATH500 gold-vs-gold, solution-vs-gold and shifted pairs."""
    from autocode4math.benchmarks import load_problems, reference_response, shifted_pairs, worked_solutions

    problems = load_problems("math500")
    workloads = {
        "math500_gold_vs_gold": [(reference_response(p), p.answer, p.benchmark) for p in problems],
        "math500_solution_vs_gold": [(worked_solutions(p)[0], p.answer, p.benchmark) for p in problems],
        "math500_shifted": shifted_pairs(problems),
    }
    figures: dict[str, float] = {}
    with GradingPool(workers) as pool:
        pool.grade_many(workloads["math500_shifted"][: 4 * pool.n_workers], timeout_s)  # start and warm the workers
        for name, items in workloads.items():
            start = time.perf_counter()
            grades = pool.grade_many(items, timeout_s)
            figures[f"{name}_pairs_per_s"] = len(items) / (time.perf_counter() - start)
            figures[f"{name}_correct"] = sum(g.correct for g in grades)
            figures[f"{name}_timed_out"] = sum(g.timed_out for g in grades)
        figures["workers"] = pool.n_workers
    return figures
