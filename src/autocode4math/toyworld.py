"""The embedded toy world: synthetic math word problems whose CoT/code boundary is designed.

This is a designed testbed, not a benchmark of mathematical ability. Its three families are built so
that a ~2M-parameter model shows the phenomena of the paper on a CPU in minutes:

- `arith`  (short sums and differences of one-digit numbers): the tiny model can do these in its
  head and with code; neither mode should win.
- `mul`    (multi-digit multiplication in a one-line story): the chain of thought needs partial
  products and a multi-term sum with carries, beyond the tiny model's arithmetic; the program is
  `print(a * b)`, two numbers to copy. Code should win.
- `story`  (a person's count changes through 2-4 events, numbers below 10): the chain of thought is a
  few one-step sums of small numbers, next to the words that define them. The program must state the
  whole story as one expression whose signs and parentheses depend on events far back in the
  question (program-of-thought style), and programs for this family are rare in the pretraining
  corpus (`BaseMix.story_code_share`). Both are properties of the model's data and capacity, not of
  the writer: every program the writer emits is correct and is run to fill its output block.

The difficulty knob (1-3) lengthens each family: more terms, more digits, more events.

Solutions follow the rollout engine's format exactly: reasoning text; code in a python block followed
at once by its output block (the output filled by running the code); the answer as `\\boxed{N}`.
Code responses start with the code prefix (`prompts.CODE_PREFIX` + newline), which is forced in `code`
mode and chosen by the model in `auto` mode.

Deliberately simplified: integer answers only, English templates with a handful of names and nouns,
no units beyond the noun; the writers' code is run with a plain `exec` because it is our own code.
"""

from __future__ import annotations

import contextlib
import io
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from autocode4math.io import read_jsonl, write_jsonl
from autocode4math.prompts import CODE_PREFIX, build_prompt

DIFFICULTIES = (1, 2, 3)
SPLITS = {"train": (2000, 101), "dev": (300, 202), "test": (600, 303)}
"""Shipped split sizes and their seeds."""
DATA_DIR = Path(__file__).parent / "data" / "toy"


@dataclass(frozen=True)
class ToyItem:
    """One generated problem with the structure its writers need."""

    family: str
    difficulty: int
    question: str
    answer: int
    spec: dict[str, Any] = field(default_factory=dict, compare=False)
    """Family-specific structure (numbers, events) the writers use."""

    def to_row(self, idx: str, benchmark: str = "toy") -> dict[str, Any]:
        """The benchmark row: {id, question, answer, benchmark, meta}."""
        meta = {"family": self.family, "difficulty": self.difficulty}
        return {"id": idx, "question": self.question, "answer": self.answer, "benchmark": benchmark, "meta": meta}


def run_code(code: str) -> str:
    """Run our own writer's code and return what it printed (trusted code only, not model output)."""
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        exec(code, {})  # noqa: S102 - the writers' own programs, never model output
    return buf.getvalue().strip()


def code_response(code: str) -> str:
    """A code solution in the rollout engine's exact format, its output filled by running the code."""
    output = run_code(code)
    return f"```python\n{code}\n```\n```output\n{output}\n```\nThe answer is \\boxed{{{output}}}."


def _answer(n: int) -> str:
    return f"The answer is \\boxed{{{n}}}."


# --- arith: small mental arithmetic -------------------------------------------------------------


def _gen_arith(rng: random.Random, difficulty: int) -> ToyItem:
    terms = [rng.randint(2, 9)]
    ops: list[str] = []
    value = terms[0]
    for _ in range(difficulty + 1):
        n = rng.randint(1, 9)
        op = "-" if n <= value and rng.random() < 0.5 else "+"
        value = value + n if op == "+" else value - n
        terms.append(n)
        ops.append(op)
    expr = _expr(terms, ops)
    return ToyItem("arith", difficulty, f"Compute {expr}.", value, {"terms": terms, "ops": ops})


def _expr(terms: list[int], ops: list[str]) -> str:
    return str(terms[0]) + "".join(f" {op} {n}" for op, n in zip(ops, terms[1:], strict=True))


def _cot_arith(item: ToyItem) -> str:
    terms, ops = item.spec["terms"], item.spec["ops"]
    value, steps = terms[0], []
    for op, n in zip(ops, terms[1:], strict=True):
        new = value + n if op == "+" else value - n
        steps.append(f"{value} {op} {n} = {new}.")
        value = new
    return " ".join(steps) + " " + _answer(value)


def _code_arith(item: ToyItem) -> str:
    return f"print({_expr(item.spec['terms'], item.spec['ops'])})"


# --- mul: long multiplication -------------------------------------------------------------------

_MUL_DIGITS = {1: (2, 1), 2: (3, 2), 3: (3, 3)}
_MUL_TEMPLATES = (
    "A crate holds {a} bottles. How many bottles are in {b} crates?",
    "Each ticket costs {a} dollars. How many dollars do {b} tickets cost?",
    "A farm has {b} rows with {a} trees in each row. How many trees are there?",
)


def _digits(rng: random.Random, n: int) -> int:
    return rng.randint(10 ** (n - 1) + 1, 10**n - 1)


def _gen_mul(rng: random.Random, difficulty: int) -> ToyItem:
    da, db = _MUL_DIGITS[difficulty]
    a, b = _digits(rng, da), _digits(rng, db)
    question = rng.choice(_MUL_TEMPLATES).format(a=a, b=b)
    return ToyItem("mul", difficulty, question, a * b, {"a": a, "b": b})


def _cot_mul(item: ToyItem) -> str:
    a, b = item.spec["a"], item.spec["b"]
    return _product_text(a, b) + " " + _answer(a * b)


def _product_text(a: int, b: int) -> str:
    """`a * b = ...` by partial products over b's digits (one step when b has one nonzero digit)."""
    text = str(b)
    parts = [int(d) * 10 ** (len(text) - 1 - i) for i, d in enumerate(text) if d != "0"]
    if len(parts) == 1:
        return f"{a} * {b} = {a * b}."
    split = " + ".join(f"{a} * {p}" for p in parts)
    products = " + ".join(str(a * p) for p in parts)
    return f"{a} * {b} = {split} = {products} = {a * b}."


def _code_mul(item: ToyItem) -> str:
    return f"print({item.spec['a']} * {item.spec['b']})"


# --- story: a count that changes through small events -------------------------------------------

_PEOPLE = (("Mia", "she"), ("Tom", "he"), ("Ana", "she"), ("Leo", "he"), ("Eva", "she"), ("Sam", "he"))
_OBJECTS = ("shells", "apples", "coins", "stamps", "cards", "marbles")
_EVENTS = {
    "found": ("+", "finds {k} more"),
    "bought": ("+", "buys {k} more"),
    "given": ("-", "gives {k} away"),
    "lost": ("-", "loses {k}"),
    "doubled": ("*", "doubles them"),
}


def _gen_story(rng: random.Random, difficulty: int) -> ToyItem:
    name, pronoun = rng.choice(_PEOPLE)
    obj = rng.choice(_OBJECTS)
    value = start = rng.randint(2, 9)
    events: list[tuple[str, int]] = []
    for _ in range(difficulty + 1):
        kinds = [k for k in _EVENTS if k != "doubled" or (value <= 12 and all(e[0] != k for e in events))]
        kind = rng.choice([k for k in kinds if _EVENTS[k][0] != "-" or value >= 2])
        k = 2 if kind == "doubled" else rng.randint(1, 9 if _EVENTS[kind][0] == "+" else min(9, value - 1))
        value = _apply(value, _EVENTS[kind][0], k)
        events.append((kind, k))
    sentences = [f"{name} has {start} {obj}."]
    for kind, k in events:
        sentences.append(f"Then {pronoun} {_EVENTS[kind][1].format(k=k)}.")
    sentences.append(f"How many {obj} does {name} have now?")
    return ToyItem("story", difficulty, " ".join(sentences), value, {"start": start, "obj": obj, "events": events})


def _apply(value: int, op: str, k: int) -> int:
    return value + k if op == "+" else value - k if op == "-" else value * k


def _cot_story(item: ToyItem) -> str:
    steps, value = _story_steps(item.spec["start"], item.spec["events"])
    return " ".join(steps) + " " + _answer(value)


def _code_story(item: ToyItem) -> str:
    """Program-of-thought style: name each quantity, then one expression for the whole story."""
    lines, expr = _story_program(item.spec["obj"], item.spec["start"], item.spec["events"])
    return "\n".join([*lines, f"print({expr})"])


def _story_program(name: str, start: int, events: list[tuple[str, int]]) -> tuple[list[str], str]:
    """(assignments, expression) of a story: one variable per quantity, the story as one expression."""
    lines, expr = [f"{name} = {start}"], name
    used: list[str] = []
    for kind, k in events:
        op = _EVENTS[kind][0]
        if op == "*":
            expr = f"({expr}) * 2" if " " in expr else f"{expr} * 2"
            continue
        var = kind if kind not in used else f"{kind}_{used.count(kind) + 1}"
        used.append(kind)
        lines.append(f"{var} = {k}")
        expr = f"{expr} {op} {var}"
    return lines, expr


def _story_steps(start: int, events: list[tuple[str, int]]) -> tuple[list[str], int]:
    """The CoT steps `v op k = new.` of a story and its final count."""
    value, steps = start, []
    for kind, k in events:
        op = _EVENTS[kind][0]
        new = _apply(value, op, k)
        steps.append(f"{value} {op} {k} = {new}.")
        value = new
    return steps, value


# --- mid: a story about containers whose last step is a product (text first, then code) ----------

_CONTAINERS = (
    ("box", "boxes", "shells"),
    ("bag", "bags", "marbles"),
    ("pack", "packs", "cards"),
    ("jar", "jars", "coins"),
)
_MID_EVENTS = {
    "found": "finds {k} more {unit}",
    "bought": "buys {k} more {unit}",
    "given": "gives {k} {unit} away",
    "lost": "loses {k} {unit}",
}
"""Event wording (the operation is _EVENTS'); `unit` is the container's plural, or singular for k = 1."""
_MID_MIN_COUNT = 10
"""The count of containers starts at 10-19 and never falls below 10: the product is never one-digit times one-digit."""


def _gen_mid(rng: random.Random, difficulty: int) -> ToyItem:
    """`difficulty` events change a two-digit count of containers (it stays at 10 or more); each holds a
    one-digit number of objects, so the last step is a two-digit by one-digit product.

    The numbers are sized for the toy model: the story's steps are the `story` family's one-digit
    additions, the product is the `mul` family's easiest kind (toy-base gets 2% of those in its head;
    toy-mid-base, trained on this family, learned most of them: docs/toyworld.md), and a program for it
    copies only the count just written and one digit from the question.
    """
    name, pronoun = rng.choice(_PEOPLE)
    one, unit, obj = rng.choice(_CONTAINERS)
    value = start = rng.randint(_MID_MIN_COUNT, _MID_MIN_COUNT + 9)
    events: list[tuple[str, int]] = []
    for _ in range(difficulty):
        kind = rng.choice([k for k in _MID_EVENTS if _EVENTS[k][0] == "+" or value > _MID_MIN_COUNT])
        k = rng.randint(1, 9) if _EVENTS[kind][0] == "+" else rng.randint(1, min(9, value - _MID_MIN_COUNT))
        value = _apply(value, _EVENTS[kind][0], k)
        events.append((kind, k))
    per = rng.randint(3, 9)
    sentences = [f"{name} has {start} {unit} of {obj}."]
    sentences += [
        f"Then {pronoun} {_MID_EVENTS[kind].format(k=k, unit=one if k == 1 else unit)}." for kind, k in events
    ]
    sentences += [f"Each {one} holds {per} {obj}.", f"How many {obj} does {name} have now?"]
    spec = {"start": start, "events": events, "per": per, "unit": unit, "count": value}
    return ToyItem("mid", difficulty, " ".join(sentences), value * per, spec)


def _cot_mid(item: ToyItem) -> str:
    """One step per line: the story's sums, then the product in the head."""
    steps, count = _story_steps(item.spec["start"], item.spec["events"])
    return "\n".join([*steps, _product_text(count, item.spec["per"]), _answer(item.answer)])


def _code_mid(item: ToyItem) -> str:
    """Program-of-thought from the start: the whole story as one expression, times the content."""
    lines, expr = _story_program(item.spec["unit"], item.spec["start"], item.spec["events"])
    return "\n".join([*lines, f"print(({expr}) * {item.spec['per']})"])


def switch_text(item: ToyItem) -> str:
    """The part of a mid solution before its switch to code: the story's steps, one per line, then a newline."""
    if item.family != "mid":
        raise ValueError(f"only the mid family switches to code mid-solution, not {item.family!r}")
    steps, _ = _story_steps(item.spec["start"], item.spec["events"])
    return "\n".join(steps) + "\n"


def write_switch(item: ToyItem) -> str:
    """The designed best solution of a mid problem: text for the story, then the code prefix and code for the
    product (`print(count * per)`), its output filled by running it."""
    code = code_response(f"print({item.spec['count']} * {item.spec['per']})")
    return switch_text(item) + CODE_PREFIX + "\n" + code


@dataclass(frozen=True)
class Family:
    """A problem family: a generator with a difficulty knob, a CoT writer and a code writer."""

    name: str
    generate: Callable[[random.Random, int], ToyItem]
    cot: Callable[[ToyItem], str]
    code: Callable[[ToyItem], str]
    """Returns the program only; `code_response` turns it into a full solution."""


FAMILIES: dict[str, Family] = {
    "arith": Family("arith", _gen_arith, _cot_arith, _code_arith),
    "mul": Family("mul", _gen_mul, _cot_mul, _code_mul),
    "story": Family("story", _gen_story, _cot_story, _code_story),
}
"""The families of the main toy world (source `toy`)."""
ALL_FAMILIES: dict[str, Family] = {**FAMILIES, "mid": Family("mid", _gen_mid, _cot_mid, _code_mid)}
"""Every family, including `mid`, which has its own source (`toy-mid`) so the main splits stay as they are."""


def generate(family: str, difficulty: int, rng: random.Random) -> ToyItem:
    """One problem of `family` at `difficulty` (1-3)."""
    if family not in ALL_FAMILIES:
        raise ValueError(f"unknown toy family {family!r}; expected one of {sorted(ALL_FAMILIES)}")
    if difficulty not in DIFFICULTIES:
        raise ValueError(f"toy difficulty must be one of {DIFFICULTIES}, got {difficulty!r}")
    return ALL_FAMILIES[family].generate(rng, difficulty)


def write_cot(item: ToyItem) -> str:
    """The chain-of-thought solution of `item`."""
    return ALL_FAMILIES[item.family].cot(item)


def write_code(item: ToyItem) -> str:
    """The code solution of `item` (without the code prefix), its output block filled by running it."""
    response = code_response(ALL_FAMILIES[item.family].code(item))
    if not response.endswith(f"\\boxed{{{item.answer}}}."):
        raise RuntimeError(f"code writer for {item.family!r} disagrees with the answer {item.answer}: {response!r}")
    return response


def stream(
    seed: int, exclude: set[str] | None = None, families: tuple[str, ...] = tuple(FAMILIES)
) -> Iterator[ToyItem]:
    """An endless stream of problems, families and difficulties uniform, skipping `exclude`d questions."""
    rng = random.Random(seed)
    seen = set(exclude or ())
    while True:
        item = generate(rng.choice(list(families)), rng.choice(DIFFICULTIES), rng)
        if item.question not in seen:
            seen.add(item.question)
            yield item


@dataclass(frozen=True)
class Source:
    """A set of toy splits: its families, split sizes and seeds, and where the files live."""

    families: tuple[str, ...]
    splits: dict[str, tuple[int, int]]
    """split -> (size, seed)."""
    data_dir: Path


SOURCES = {
    "toy": Source(tuple(FAMILIES), SPLITS, DATA_DIR),
    "toy-mid": Source(
        ("mid",), {"train": (1000, 111), "dev": (150, 212), "test": (300, 313)}, DATA_DIR.parent / "toy-mid"
    ),
}
"""`toy`: the main world (arith, mul, story). `toy-mid`: the mid-reasoning family on its own, so that adding it
changed none of the main splits, checkpoints or figures."""


def source_of(name: str) -> Source:
    """The toy source called `name` (ValueError naming the known ones otherwise)."""
    if name not in SOURCES:
        raise ValueError(f"unknown toy source {name!r}; expected one of {sorted(SOURCES)}")
    return SOURCES[name]


def make_split(split: str, exclude: set[str] | None = None, source: str = "toy") -> list[ToyItem]:
    """The problems of a shipped split (fixed size and seed), none of whose questions is in `exclude`."""
    src = source_of(source)
    if split not in src.splits:
        raise ValueError(f"unknown toy split {split!r}; expected one of {sorted(src.splits)}")
    size, seed = src.splits[split]
    items = stream(seed, exclude, src.families)
    return [next(items) for _ in range(size)]


def write_splits(out_dir: str | Path | None = None, source: str = "toy") -> dict[str, Path]:
    """Write test, dev and train of `source` (in that order, each disjoint from the ones before) as JSONL."""
    out_dir = Path(out_dir) if out_dir else source_of(source).data_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    taken: set[str] = set()
    paths = {}
    for split in ("test", "dev", "train"):
        items = make_split(split, taken, source)
        taken.update(item.question for item in items)
        paths[split] = out_dir / f"{split}.jsonl"
        write_jsonl(paths[split], [item.to_row(f"{source}-{split}-{i}", source) for i, item in enumerate(items)])
    return paths


def held_out_questions(data_dirs: tuple[str | Path, ...] = tuple(s.data_dir for s in SOURCES.values())) -> set[str]:
    """Questions of the shipped dev and test splits of every source, kept out of every training corpus."""
    return {
        row["question"]
        for d in data_dirs
        for split in ("dev", "test")
        for row in read_jsonl(Path(d) / f"{split}.jsonl")
    }


# --- demonstrations for pretraining --------------------------------------------------------------


@dataclass(frozen=True)
class Demo:
    """One training sequence: prompt, forced-or-chosen prefix, response."""

    prompt: str
    prefix: str
    """Forced start of the response (code mode), "" otherwise; never trained on."""
    response: str
    """Trained text; in auto-mode code demos it starts with the code prefix the model chooses."""


@dataclass
class BaseMix:
    """Composition of the base model's corpus (the paper's base: mostly CoT, a little code)."""

    auto_share: float = 0.5
    """Share of demos with the auto prompt answered by the model itself."""
    cot_share: float = 0.25
    """Share of demos with the cot prompt (always CoT)."""
    auto_code_rate: float = 0.03
    """Chance that an auto-mode demo is answered with code (the paper's base models: under 5%)."""
    story_code_share: float = 0.1
    """Chance that a story problem drawn for a code demo keeps it (else it becomes a cot demo):
    programs for stories are rare in the corpus, as code for word problems is in real corpora."""
    mid_share: float = 0.0
    """Share of demos drawn from the mid family (source toy-mid); 0 leaves the corpus exactly as before."""
    mid_switch_share: float = 0.5
    """Share of mid code-mode demos whose forced prefix is the story's text plus the code prefix (the model
    learns to write code after text it is given); the rest force the code prefix alone and are programs of
    the whole story, kept as rarely as story programs (`story_code_share`)."""

    def __post_init__(self) -> None:
        for name in ("auto_share", "cot_share", "auto_code_rate", "story_code_share", "mid_share", "mid_switch_share"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"BaseMix.{name} must be in [0, 1], got {getattr(self, name)}")
        if self.auto_share + self.cot_share > 1.0:
            raise ValueError("BaseMix.auto_share + cot_share must be at most 1 (the rest are code-mode demos)")


def demo(item: ToyItem, mode: str, use_code: bool) -> Demo:
    """A demonstration of `item`: `mode` picks the prompt; code demos in `code` mode force the prefix."""
    prompt = build_prompt(item.question, mode)
    if not use_code:
        return Demo(prompt.text, "", write_cot(item))
    code = write_code(item)
    if mode == "code":
        return Demo(prompt.text, prompt.prefix, code)
    return Demo(prompt.text, "", CODE_PREFIX + "\n" + code)


def base_corpus(n: int, seed: int, mix: BaseMix | None = None, exclude: set[str] | None = None) -> list[Demo]:
    """The base model's corpus: mostly CoT, code mostly behind the forced prefix, story code rare; with
    `mix.mid_share`, mid problems too (`mid_demo`)."""
    mix = mix or BaseMix()
    rng = random.Random(seed + 1)
    items = stream(seed, exclude)
    mids = stream(seed + 2, exclude, ("mid",)) if mix.mid_share else None  # no extra draws without mid problems
    out = []
    while len(out) < n:
        item = next(mids) if mids is not None and rng.random() < mix.mid_share else next(items)
        r = rng.random()
        mode = "auto" if r < mix.auto_share else "cot" if r < mix.auto_share + mix.cot_share else "code"
        use_code = mode == "code" or (mode == "auto" and rng.random() < mix.auto_code_rate)
        if use_code and item.family == "mid":
            out.append(mid_demo(item, mode, rng, mix))
            continue
        if use_code and item.family == "story" and rng.random() >= mix.story_code_share:
            mode, use_code = "cot", False
        out.append(demo(item, mode, use_code))
    return out


def mid_demo(item: ToyItem, mode: str, rng: random.Random, mix: BaseMix) -> Demo:
    """A code demo of a mid problem: in auto mode the switch chosen unprompted (text, then the code prefix and
    code: rare, like all unprompted code); in code mode the switch point forced (`mix.mid_switch_share`), else
    a program of the whole story after the code prefix (rare), else a CoT demo."""
    prompt = build_prompt(item.question, mode)
    if mode == "auto":
        return Demo(prompt.text, "", write_switch(item))
    if rng.random() < mix.mid_switch_share:
        head = switch_text(item) + CODE_PREFIX + "\n"
        return Demo(prompt.text, head, write_switch(item).removeprefix(head))
    if rng.random() < mix.story_code_share:
        return demo(item, "code", True)
    return demo(item, "cot", False)


def check_code_digits(code_digits: str) -> None:
    """`code_digits` is empty (coin flip) or a string of ASCII digits; else ValueError."""
    if code_digits and not (code_digits.isdigit() and code_digits.isascii()):
        raise ValueError(f"code_digits must be a string of digits 0-9, got {code_digits!r}")


def sft_corpus(
    n: int,
    seed: int,
    code_rate: float = 0.5,
    exclude: set[str] | None = None,
    mode_share: float = 0.0,
    code_digits: str = "",
) -> list[Demo]:
    """A fixed tool-integrated SFT set: auto prompts whose code choice is not tied to the family.

    By default each auto demo uses code with probability `code_rate` (a coin flip). With `code_digits`
    (e.g. "7") an auto demo uses code exactly when its question contains one of those digits: a
    surface feature, unrelated to what the problem needs, that the model can read off the question,
    so that under greedy decoding its choice is still unrelated to the family (real tool-integrated
    sets likewise pick code by source or annotator, not by need).

    `mode_share` of the demos instead keep the prompted modes in practice (half cot-prompt CoT, half
    code-mode with the forced prefix), so that fine-tuning does not erase the cot instruction.
    """
    if not 0.0 <= code_rate <= 1.0:
        raise ValueError(f"code_rate must be in [0, 1], got {code_rate}")
    if not 0.0 <= mode_share <= 1.0:
        raise ValueError(f"mode_share must be in [0, 1], got {mode_share}")
    check_code_digits(code_digits)
    rng = random.Random(seed + 1)
    items = stream(seed, exclude)
    out = []
    for _ in range(n):
        item = next(items)
        r = rng.random() if mode_share else 1.0  # no extra draw by default: the shipped toy-sft's corpus
        if r < mode_share / 2:
            out.append(demo(item, "cot", False))
        elif r < mode_share:
            out.append(demo(item, "code", True))
        elif code_digits:
            out.append(demo(item, "auto", any(d in item.question for d in code_digits)))
        else:
            out.append(demo(item, "auto", rng.random() < code_rate))
    return out
