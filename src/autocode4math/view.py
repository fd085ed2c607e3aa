"""`autocode view`: one self-contained HTML page for reading the trajectories of a run.

Why a static file: it opens from disk in any browser, needs no server and no network, and can be
attached to a message. Everything (data, script, styles) is inside it; nothing is fetched.

What it reads. Any directory below RUN_DIR holding one of these is a *source* of trajectories:
- an evaluation (`samples.jsonl`, evaluate.py), each mode's trajectories;
- an E-step (`rollouts.jsonl` with `audit.jsonl`, estep.py): the rollouts, per query Q(x,0), Q(x,1),
  pi(c=1|x), s*, which rollouts were subsampled into `train.jsonl`, and every rollout's advantage;
- an on-policy RL collection (`rollouts.jsonl` with `train.jsonl`, em.py), every rollout a training record.
So a training run (`iter-XX/collect`, `iter-XX/eval`) and the demo (its method runs and `test/<model>`)
are read whole. Two run directories give one page whose sources are prefixed A and B.

Model-written versus tool-inserted text (the training mask): after each executed block the engine
inserts exactly "\\n" + feedback + "\\n```\\n" with mask 0 (rollout/engine.py). The page shows those
spans, found again from `code_blocks`, as tool text, the rest as model text, with each span's token
count from `segments`. The forced prefix is context (neither trained nor generated), shown apart.

Compactness: questions and repeated strings are stored once, rows as arrays, and a page whose data
exceeds `COMPRESS_ABOVE` bytes embeds it gzip-compressed (base64), which the page inflates with the
browser's DecompressionStream. The page renders one page of rows at a time and builds a
trajectory's detail only when it is opened.

Deliberately simplified: the page is read-only; token ids are not shown (the spans stand for them);
a fixed SFT set (em.py's `sft` method: token ids without text) is not a source.
"""

from __future__ import annotations

import base64
import gzip
import json
import shutil
from collections import defaultdict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from autocode4math.io import DataError, read_jsonl, replacing

ASSETS = Path(__file__).parent / "data" / "view"
COMPRESS_ABOVE = 2_000_000
"""Embedded JSON larger than this many bytes is gzip-compressed in the page."""
FIELDS = [
    "q",
    "src",
    "mode",
    "sample",
    "c",
    "correct",
    "pred",
    "gstat",
    "gerr",
    "finish",
    "tokens",
    "ptokens",
    "calls",
    "prefix",
    "spans",
    "blocks",
    "flags",
    "adv",
    "chosen",
]
"""The columns of a row in the embedded data (the page's script reads them by name)."""
FLAG_DECISIVE, FLAG_WRONG_CHOICE, FLAG_RUNS_DIFFER = 1, 2, 4
"""Row flags: its question's cot and code (or c=0 and c=1) success rates differ; an unprompted trajectory
whose code decision was the worse one; the two runs' success rates on this question and mode differ."""
REQUIRED = ("id", "benchmark", "mode", "sample", "question", "answer", "prefix", "response", "code_blocks", "correct")
"""Keys a rollout record needs to be shown (docs/architecture.md lists them all)."""
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-sync",
)


@dataclass
class Source:
    """One directory of trajectories inside a run."""

    name: str
    """Its label on the page: the path below the run directory, prefixed A/B with two runs."""
    run: int
    """0 for RUN_DIR, 1 for RUN_DIR_B."""
    kind: str
    """eval, estep or rl."""
    path: Path
    records: list[dict[str, Any]] = field(default_factory=list)


def find_sources(run_dir: Path, run: int = 0, prefix: str = "") -> list[Source]:
    """Every directory at or below `run_dir` that holds samples.jsonl (eval) or rollouts.jsonl (E-step, RL)."""
    dirs = {p.parent for name in ("samples.jsonl", "rollouts.jsonl") for p in run_dir.rglob(name)}
    out = []
    for d in sorted(dirs):
        kind = "eval" if (d / "samples.jsonl").exists() else "estep" if (d / "audit.jsonl").exists() else "rl"
        rel = d.relative_to(run_dir).as_posix()
        name = prefix + (run_dir.name if rel == "." else rel)
        out.append(Source(name, run, kind, d))
    return out


def read_records(path: Path) -> list[dict[str, Any]]:
    """Records of a JSONL file another process may still be appending to (a torn last line is skipped)."""
    return list(read_jsonl(path, torn_tail_ok=True))


def _configs(source: Source, root: Path) -> list[dict[str, Any]]:
    """The YAML configs that govern a source, nearest first (its own, then the run's)."""
    import yaml

    found = []
    for d in [source.path, *source.path.parents]:
        for name in ("estep_config.yaml", "config.yaml"):
            if (d / name).exists():
                found.append(yaml.safe_load((d / name).read_text(encoding="utf-8")) or {})
        if d == root:
            break
    return found


def _setting(configs: list[dict[str, Any]], *paths: str, default: Any = None) -> Any:
    """The first value found under any dotted path, in the nearest config first."""
    for cfg in configs:
        for dotted in paths:
            node: Any = cfg
            for part in dotted.split("."):
                node = node.get(part) if isinstance(node, dict) else None
            if node is not None:
                return node
    return default


def _meta_from_configs(configs: list[dict[str, Any]]) -> dict[tuple[str, str], dict]:
    """Problem meta for runs written before records carried it: reload their local problem sources."""
    from autocode4math.benchmarks import BENCHMARKS, load_problems

    out: dict[tuple[str, str], dict] = {}
    for cfg in configs:
        sources = [*(cfg.get("benchmarks") or []), *(cfg.get("benchmark_files") or [])]
        split = "test"
        if cfg.get("queries"):
            sources, split = [cfg["queries"]], "train"
        for src in sources:
            local = src in BENCHMARKS or str(src).startswith("toy") or Path(str(src)).exists()
            if not local:
                continue
            try:
                problems = load_problems(str(src), split=split)
            except (DataError, OSError, ValueError):
                continue
            out.update({(p.benchmark, str(p.id)): p.meta for p in problems})
    return out


def load_source(source: Source, root: Path) -> dict[str, Any]:
    """Read a source's records and its E-step extras; return its per-query audit (may be empty)."""
    from autocode4math.estep import advantages, decision_of, q_values, record_key
    from autocode4math.prompts import PromptConfig

    configs = _configs(source, root)
    code_prefix = _setting(
        configs, "prompt.code_prefix", "estep.prompt.code_prefix", default=PromptConfig().code_prefix
    )
    path = source.path / _records_file(source)
    records = read_records(path)
    for i, r in enumerate(records):
        missing = [k for k in REQUIRED if k not in r]
        if missing:
            raise DataError(f"{path}: record {i + 1} lacks {missing}: not a rollout record")
    if any("meta" not in r for r in records):
        metas = _meta_from_configs(configs)
        for r in records:
            r.setdefault("meta", metas.get((str(r["benchmark"]), str(r["id"])), {}))
    for r in records:
        r["_c"] = decision_of(r, code_prefix)
    source.records = records
    audit: dict[str, list[Any]] = {}
    if source.kind == "eval":  # question ids are unique within a benchmark only
        for bench in {str(r["benchmark"]) for r in records}:
            group = [r for r in records if str(r["benchmark"]) == bench]
            _flag_choices(group, _mode_rates(group, "cot"), _mode_rates(group, "code"), lambda r: r["mode"] == "auto")
        return audit
    q = q_values(records, code_prefix)
    rates0 = {k: v[0] for k, v in q.items() if v[0] is not None}
    rates1 = {k: v[1] for k, v in q.items() if v[1] is not None}
    _flag_choices(records, rates0, rates1, lambda r: r["mode"] == "auto" and not r["prefix"])
    train_path = source.path / "train.jsonl"
    train = {row["key"]: row.get("advantage") for row in (read_records(train_path) if train_path.exists() else [])}
    eps = float(_setting(configs, "adv_eps", "estep.adv_eps", default=1e-6))
    for r, adv in zip(records, advantages(records, eps), strict=True):
        key = record_key(r)
        r["_chosen"], r["_adv"] = key in train, train.get(key, adv)
    for row in read_records(source.path / "audit.jsonl") if source.kind == "estep" else []:
        qv, s, n = row["Q"], row["s_star"], row["n"]
        audit[str(row["id"])] = [qv["0"], qv["1"], row["pi_code"], s["0"], s["1"], n["0"], n["1"], len(row["chosen"])]
    return audit


def _records_file(source: Source) -> str:
    return "samples.jsonl" if source.kind == "eval" else "rollouts.jsonl"


def _mode_rates(records: Sequence[dict[str, Any]], mode: str) -> dict[str, float]:
    from autocode4math.analysis import per_question

    return per_question([r for r in records if r["mode"] == mode])


def _flag_choices(records: list[dict[str, Any]], rates0: dict, rates1: dict, judged: Any) -> None:
    """Set `_flags`: decisive question (success rates of c=0 and c=1 differ) and wrong unprompted choice."""
    for r in records:
        qid, flags = str(r["id"]), 0
        if qid in rates0 and qid in rates1 and rates0[qid] != rates1[qid]:
            flags |= FLAG_DECISIVE
            if judged(r) and r["_c"] != int(rates1[qid] > rates0[qid]):
                flags |= FLAG_WRONG_CHOICE
        r["_flags"] = flags


def _flag_run_differences(sources: list[Source]) -> None:
    """With two runs: flag trajectories of (benchmark, question, mode) whose success rate differs between them."""
    rates: dict[tuple, list[list[int]]] = defaultdict(lambda: [[0, 0], [0, 0]])
    for s in sources:
        for r in s.records:
            cell = rates[(str(r["benchmark"]), str(r["id"]), r["mode"])][s.run]
            cell[0] += bool(r["correct"])
            cell[1] += 1
    for s in sources:
        for r in s.records:
            (ok_a, n_a), (ok_b, n_b) = rates[(str(r["benchmark"]), str(r["id"]), r["mode"])]
            if n_a and n_b and ok_a / n_a != ok_b / n_b:
                r["_flags"] |= FLAG_RUNS_DIFFER


def text_spans(record: dict[str, Any]) -> list[tuple[str, str]] | None:
    """The response as (kind, text) spans, kind "model" or "tool"; None when a tool output cannot be found.

    A tool span is the engine's insertion after the stop string of an executed block, rebuilt with the
    sandbox's own `feedback()` from the block's status, output and error.
    """
    from autocode4math.rollout.engine import STOP
    from autocode4math.sandbox import ExecResult

    response, pos, spans = record["response"], 0, []
    for b in record["code_blocks"]:
        if b["status"] == "not_run":
            continue
        tool = "\n" + ExecResult(b["status"], b.get("output", ""), b.get("error", ""), 0.0).feedback() + "\n```\n"
        at = response.find(STOP + tool, pos)
        if at < 0:
            return None
        at += len(STOP)
        spans += [("model", response[pos:at]), ("tool", tool)]
        pos = at + len(tool)
    spans.append(("model", response[pos:]))
    return [(k, t) for k, t in spans if t]


def _spans_with_tokens(record: dict[str, Any]) -> list[list[Any]]:
    """[[kind 0 model / 1 tool / 2 unknown, text, tokens or None], ...]; token counts when spans match segments."""
    spans = text_spans(record)
    if spans is None:
        return [[2, record["response"], None]]
    segments = record.get("segments") or []
    same = [s["kind"] for s in segments] == [k for k, _ in spans]
    return [
        [0 if kind == "model" else 1, text, (segments[i]["end"] - segments[i]["start"]) if same else None]
        for i, (kind, text) in enumerate(spans)
    ]


class _Interner:
    """Stores each distinct string once; rows refer to it by index."""

    def __init__(self) -> None:
        self.items: list[str] = []
        self.index: dict[str, int] = {}

    def __call__(self, text: str) -> int:
        if text not in self.index:
            self.index[text] = len(self.items)
            self.items.append(text)
        return self.index[text]


def _row(r: dict[str, Any], q: int, src: int, strings: _Interner) -> list[Any]:
    blocks = [
        [strings(b["status"]), b.get("duration_s"), b.get("error", "") if b["status"] != "ok" else ""]
        for b in r["code_blocks"]
    ]
    values = {
        "q": q,
        "src": src,
        "mode": strings(r["mode"]),
        "sample": r["sample"],
        "c": r["_c"],
        "correct": int(bool(r["correct"])),
        "pred": r.get("pred"),
        "gstat": strings(r["grade_status"]) if "grade_status" in r else None,
        "gerr": r.get("grade_error") or "",
        "finish": strings(r.get("finish_reason") or ""),
        "tokens": r.get("n_generated_tokens"),
        "ptokens": r.get("n_prompt_tokens"),
        "calls": r.get("n_code_calls", 0),
        "prefix": strings(r.get("prefix") or ""),
        "spans": _spans_with_tokens(r),
        "blocks": blocks,
        "flags": r["_flags"],
        "adv": None if r.get("_adv") is None else round(float(r["_adv"]), 4),
        "chosen": None if "_chosen" not in r else int(r["_chosen"]),
    }
    return [values[f] for f in FIELDS]


def page_data(run_dirs: Sequence[str | Path]) -> dict[str, Any]:
    """Everything the page shows, as one JSON-able dict (rows as arrays in FIELDS order)."""
    roots = [Path(d) for d in run_dirs]
    for root in roots:
        if not root.is_dir():
            raise FileNotFoundError(f"no such run directory: {root}")
    two = len(roots) > 1
    sources, audits = [], []
    for i, root in enumerate(roots):
        found = find_sources(root, i, f"{'AB'[i]}: " if two else "")
        if not found:
            raise DataError(f"{root}: no samples.jsonl or rollouts.jsonl below it: not a run directory")
        for s in found:
            audits.append(load_source(s, root))
            sources.append(s)
    if two:
        _flag_run_differences(sources)
    strings, questions, qindex, rows = _Interner(), [], {}, []
    for si, s in enumerate(sources):
        for r in s.records:
            key = (str(r["benchmark"]), str(r["id"]))
            if key not in qindex:
                qindex[key] = len(questions)
                questions.append([key[0], key[1], r["question"], _answer_text(r["answer"]), r.get("meta") or {}])
            rows.append(_row(r, qindex[key], si, strings))
    return {
        "title": " vs ".join(str(r) for r in roots),
        "runs": [str(r) for r in roots],
        "sources": [{"name": s.name, "run": s.run, "kind": s.kind, "n": len(s.records)} for s in sources],
        "audit": audits,
        "questions": questions,
        "strings": strings.items,
        "fields": list(FIELDS),
        "rows": rows,
    }


def _answer_text(answer: Any) -> str:
    return answer if isinstance(answer, str) else json.dumps(answer, ensure_ascii=False)


def render_page(data: dict[str, Any], compress: bool | None = None) -> str:
    """The HTML page: styles, the data (gzip+base64 when `compress`, or when large if None) and the script."""
    payload = json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    if compress is None:
        compress = len(payload.encode("utf-8")) > COMPRESS_ABOVE
    if compress:
        body, encoding = base64.b64encode(gzip.compress(payload.encode("utf-8"), mtime=0)).decode("ascii"), "gzip"
    else:
        body, encoding = payload.replace("<", "\\u003c"), "json"
    css = (ASSETS / "viewer.css").read_text(encoding="utf-8")
    script = (ASSETS / "viewer.js").read_text(encoding="utf-8")
    title = _escape(f"autocode view: {data['title']}")
    return (
        f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8"><title>{title}</title>\n'
        f'<meta name="viewport" content="width=device-width, initial-scale=1">\n<style>\n{css}</style></head>\n'
        f'<body><div id="app">Loading…</div>\n'
        f'<script type="application/octet-stream" id="data" data-encoding="{encoding}">{body}</script>\n'
        f"<script>\n{script}</script>\n</body></html>\n"
    )


def _escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace('"', "&quot;")


def write_view(run_dirs: Sequence[str | Path], out: str | Path | None = None, compress: bool | None = None) -> Path:
    """Build the page for one or two run directories; write it (default: RUN_DIR/view.html); return its path."""
    data = page_data(run_dirs)
    path = Path(out) if out else Path(run_dirs[0]) / "view.html"
    with replacing(path) as tmp:
        tmp.write_text(render_page(data, compress), encoding="utf-8")
    return path


@contextmanager
def headless_chromium(executable: str | None = None) -> Iterator[Any]:
    """A Playwright browser on the system's Chromium (`apt-get install chromium`; Playwright's downloads unused)."""
    from playwright.sync_api import sync_playwright

    exe = executable or shutil.which("chromium") or shutil.which("chromium-browser")
    if not exe:
        raise FileNotFoundError("no chromium on PATH (Debian: apt-get install chromium)")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=exe, args=list(CHROMIUM_FLAGS))
        try:
            yield browser
        finally:
            browser.close()


def synthetic_run(out: str | Path, n: int, chars: int = 1500, seed: int = 0) -> Path:
    """An eval run directory of `n` made-up trajectories shaped like real records, for the load benchmark.

    Toy-world questions in the three modes; each response is about `chars` characters of reasoning (other
    toy solutions) then the toy writer's CoT or code; executed blocks are ok, error or timeout (85/10/5%).
    """
    import random

    from autocode4math import toyworld
    from autocode4math.prompts import PromptConfig
    from autocode4math.rollout.engine import STOP
    from autocode4math.sandbox import ExecResult

    rng, out = random.Random(seed), Path(out)
    code_prefix = PromptConfig().code_prefix + "\n"

    def item() -> Any:
        return toyworld.generate(rng.choice(list(toyworld.FAMILIES)), rng.choice((1, 2, 3)), rng)

    def filler() -> str:
        text = ""
        while len(text) < chars:
            text += f"Let me check a similar case: {item().question} " + toyworld.write_cot(item()) + "\n"
        return text

    records = []
    for i in range(n):
        problem, mode = item(), ("auto", "cot", "code")[i % 3]
        spans, blocks = [filler()], []
        if mode == "code" or (mode == "auto" and rng.random() < 0.5):
            code = toyworld.FAMILIES[problem.family].code(problem)
            status = rng.choices(("ok", "error", "timeout"), (85, 10, 5))[0]
            stdout = toyworld.run_code(code) + "\n" if status == "ok" else ""
            error = {"ok": "", "error": "Traceback\nNameError: name 'x' is not defined", "timeout": "timed out"}[status]
            result = ExecResult(status, stdout, error, round(rng.uniform(0.005, 0.2), 4))
            spans[0] += f"```python\n{code}\n```\n{STOP}"
            spans += ["\n" + result.feedback() + "\n```\n", f"The answer is \\boxed{{{problem.answer}}}."]
            blocks.append(
                {"code": code, "status": status, "output": stdout, "error": error, "duration_s": result.duration_s}
            )
        else:
            spans[0] += toyworld.write_cot(problem)
        correct = rng.random() < 0.6
        kinds, starts = ["model", "tool", "model"][: len(spans)], [0]
        for text in spans:
            starts.append(starts[-1] + len(text) // 4 + 1)
        segments = [{"kind": k, "start": a, "end": b} for k, a, b in zip(kinds, starts, starts[1:], strict=False)]
        records.append(
            {
                "id": f"toy-{i // 3}",
                "benchmark": "toy",
                "mode": mode,
                "sample": 0,
                "question": problem.question,
                "answer": problem.answer,
                "meta": {"family": problem.family, "difficulty": problem.difficulty},
                "prefix": code_prefix if mode == "code" else "",
                "response": "".join(spans),
                "segments": segments,
                "code_blocks": blocks,
                "n_code_calls": len(blocks),
                "used_code": bool(blocks),
                "finish_reason": "answer",
                "n_prompt_tokens": 60,
                "n_generated_tokens": sum(s["end"] - s["start"] for s in segments if s["kind"] == "model"),
                "pred": str(problem.answer if correct else problem.answer + 1),
                "correct": correct,
            }
        )
    from autocode4math.io import write_jsonl

    write_jsonl(out / "samples.jsonl", records)
    return out


def bench_view(n: int = 20_000, chars: int = 1500, out: str | Path = "runs/bench-view", browser: bool = True) -> dict:
    """Page size and build time for `n` synthetic trajectories; with `browser`, load, filter and search times
    in headless Chromium (seconds, wall clock, as a person would wait for them)."""
    import time

    run = synthetic_run(Path(out) / "run", n, chars)
    started = time.perf_counter()
    page_path = write_view([run], Path(out) / "view.html")
    figures: dict[str, Any] = {
        "trajectories": n,
        "jsonl_mb": round((run / "samples.jsonl").stat().st_size / 1e6, 2),
        "build_s": round(time.perf_counter() - started, 2),
        "page_mb": round(page_path.stat().st_size / 1e6, 2),
        "data_json_mb (before gzip)": round(len(json.dumps(page_data([run]), separators=(",", ":"))) / 1e6, 2),
    }
    if browser:
        figures.update(_browser_times(page_path))
    return figures


def _browser_times(path: Path) -> dict[str, Any]:
    import time

    with headless_chromium() as browser:
        page = browser.new_page(viewport={"width": 1400, "height": 900})
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        started = time.perf_counter()
        page.goto(path.resolve().as_uri())
        page.wait_for_selector("body[data-ready]", timeout=120_000)
        load = time.perf_counter() - started
        timing = page.evaluate("window.viewTiming")
        started = time.perf_counter()
        page.select_option("#f-mode", "code")
        shown = page.get_attribute("#count", "data-count")
        mode_filter = time.perf_counter() - started
        started = time.perf_counter()
        page.fill("#f-search", "boxed{1")
        page.wait_for_selector('#count[data-search="boxed{1"]', timeout=120_000)
        search = time.perf_counter() - started
        started = time.perf_counter()
        page.click(".traj-head")
        page.wait_for_selector(".detail")
        open_one = time.perf_counter() - started
    return {
        "load_s": round(load, 2),
        "decode_ms": round(timing["decode_ms"]),
        "first_render_ms": round(timing["render_ms"]),
        "mode_filter_s": round(mode_filter, 3),
        "code_mode_rows": int(shown or 0),
        "first_search_s (incl. 0.15 s debounce)": round(search, 3),
        "open_trajectory_s": round(open_one, 3),
        "page_errors": len(errors),
    }
