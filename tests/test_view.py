"""`autocode view`: the data behind the page, read from real eval and E-step runs of a scripted model.

The browser checks of the page itself are in test_view_browser.py; here every figure the page shows
is compared with one derived independently from the run's JSONL.
"""

from __future__ import annotations

import base64
import gzip
import json
import re
import shutil
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from autocode4math.cli import app
from autocode4math.estep import EStepConfig, advantages, record_key, run_estep
from autocode4math.evaluate import EvalConfig, run_eval
from autocode4math.io import DataError, read_jsonl
from autocode4math.prompts import CODE_PREFIX
from autocode4math.rollout.scripted import ScriptedBackend
from autocode4math.sandbox import SandboxPool
from autocode4math.view import (
    FIELDS,
    FLAG_DECISIVE,
    FLAG_RUNS_DIFFER,
    FLAG_WRONG_CHOICE,
    page_data,
    render_page,
    text_spans,
    write_view,
)

FAMILIES = ("add", "mul", "sub")


def write_benchmark(path, count=6):
    """Questions "What is a plus 10?" with meta; a=3 has code that fails, to give a sandbox error."""
    rows = [
        {
            "id": f"q{a}",
            "question": f"What is {a} plus 10?",
            "answer": a + 10,
            "benchmark": "tiny",
            "meta": {"family": FAMILIES[a % 3], "level": 1 + a // 3},
        }
        for a in range(count)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def responder(shift: int = 0):
    """cot right for even a (+ shift); code prints a + 10 (a=3 raises first); auto uses code when a < 2."""

    def respond(ctx: str) -> str:
        a = int(re.search(r"What is (\d+) plus 10", ctx).group(1))
        if "```output" in ctx:
            out = ctx.rsplit("```output", 1)[1].split()[0]
            return f"The output shows it: \\boxed{{{out}}}" if out.isdigit() else "No answer."
        code = f"```python\nprint({a} + 10)\n```\n```output" if a != 3 else "```python\n1 / 0\n```\n```output"
        if CODE_PREFIX in ctx or ("without writing code" not in ctx and a < 2):
            return code
        return f"{a} plus 10 is \\boxed{{{a + 10 + (a + shift) % 2}}}."

    return respond


@pytest.fixture(scope="module")
def pool():
    with SandboxPool(workers=2) as p:
        yield p


def make_eval_run(tmp_path, tokenizer, pool, name="run", shift=0):
    bench = write_benchmark(tmp_path / "tiny.jsonl")
    cfg = EvalConfig(model="scripted", benchmarks=[], benchmark_files=[str(bench)], out=str(tmp_path / name))
    run_eval(cfg, backend=ScriptedBackend(tokenizer, responder(shift)), sandbox=pool, progress=False)
    return tmp_path / name


def make_estep_run(tmp_path, tokenizer, pool, name="estep"):
    from autocode4math.benchmarks import load_problems

    problems = load_problems(str(write_benchmark(tmp_path / "tiny.jsonl")))
    backend = ScriptedBackend(tokenizer, responder())
    run_estep(
        backend, problems, EStepConfig(k=2, per_query=2, alpha=4.0), tmp_path / name, sandbox=pool, progress=False
    )
    return tmp_path / name


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_tokenizer, pool):
    """One eval run, a second one whose cot answers flip (shift=1), and an E-step run; built once, never changed."""
    root = tmp_path_factory.mktemp("runs")
    return {
        "eval": make_eval_run(root, tiny_tokenizer, pool, "eval"),
        "eval_b": make_eval_run(root, tiny_tokenizer, pool, "other", shift=1),
        "estep": make_estep_run(root, tiny_tokenizer, pool),
    }


def rows_of(data):
    return [dict(zip(data["fields"], row, strict=True)) for row in data["rows"]]


def test_text_spans_find_each_tool_insertion():
    tool1, tool2 = "\n42\n```\n", "\nZeroDivisionError: division by zero\n```\n"
    response = (
        "Try.\n```python\nprint(42)\n```\n```output" + tool1 + "Again.\n```python\n1/0\n```\n```output" + tool2
    ) + "Then \\boxed{42}.\n```python\nprint(1)\n```\n```output"
    blocks = [
        {"code": "print(42)\n", "status": "ok", "output": "42\n", "error": ""},
        {"code": "1/0\n", "status": "error", "output": "", "error": "Traceback\nZeroDivisionError: division by zero"},
        {"code": "print(1)\n", "status": "not_run", "output": "", "error": "round limit"},
    ]
    spans = text_spans({"response": response, "code_blocks": blocks})
    assert [k for k, _ in spans] == ["model", "tool", "model", "tool", "model"]
    assert [t for k, t in spans if k == "tool"] == [tool1, tool2]
    assert "".join(t for _, t in spans) == response
    # output that is not in the response (a record edited by hand, or another tool format) is reported, not guessed
    assert text_spans({"response": "no output here", "code_blocks": blocks[:1]}) is None


def test_eval_page_data_matches_the_samples(runs):
    run = runs["eval"]
    samples = list(read_jsonl(run / "samples.jsonl"))
    data = page_data([run])
    rows = rows_of(data)
    assert data["fields"] == list(FIELDS) and len(rows) == len(samples) == 18
    assert [s["name"] for s in data["sources"]] == ["eval"] and data["sources"][0]["kind"] == "eval"
    by_key = {(r["mode"], r["id"]): r for r in samples}
    for row in rows:
        bench, qid, question, answer, meta = data["questions"][row["q"]]
        rec = by_key[(data["strings"][row["mode"]], qid)]
        assert (question, answer, bench) == (rec["question"], str(rec["answer"]), "tiny")
        assert (row["correct"], row["pred"], row["tokens"], row["calls"]) == (
            rec["correct"],
            rec["pred"],
            rec["n_generated_tokens"],
            rec["n_code_calls"],
        )
        assert meta == {"family": FAMILIES[int(qid[1:]) % 3], "level": 1 + int(qid[1:]) // 3}
        text = "".join(s[1] for s in row["spans"])
        assert text == rec["response"]  # the spans are the whole response, nothing lost or doubled
        assert [s[0] for s in row["spans"]] == [0 if seg["kind"] == "model" else 1 for seg in rec["segments"]]
        assert [s[2] for s in row["spans"]] == [seg["end"] - seg["start"] for seg in rec["segments"]]
        assert [data["strings"][b[0]] for b in row["blocks"]] == [b["status"] for b in rec["code_blocks"]]
        assert all(b[1] == cb["duration_s"] for b, cb in zip(row["blocks"], rec["code_blocks"], strict=True))
    # disagreements, derived here from the samples: per question cot vs code correctness
    right = {(r["mode"], r["id"]): r["correct"] for r in samples}
    decisive = {q for (m, q) in right if m == "cot" and right[("cot", q)] != right[("code", q)]}
    wrong_choice = {q for q in decisive if by_key[("auto", q)]["used_code"] != right[("code", q)]}
    # cot solves even a; code solves all but a=3 (its code raises); auto uses code for a < 2
    assert (decisive, wrong_choice) == ({"q1", "q5"}, {"q5"})
    for row in rows:
        qid, mode = data["questions"][row["q"]][1], data["strings"][row["mode"]]
        assert bool(row["flags"] & FLAG_DECISIVE) == (qid in decisive)
        assert bool(row["flags"] & FLAG_WRONG_CHOICE) == (mode == "auto" and qid in wrong_choice)


def test_disagreements_are_per_benchmark(tmp_path):
    """Two benchmarks may share question ids: cot and code are compared within each benchmark."""

    def rec(bench, mode, correct, used_code=False):
        return {
            "id": "1",
            "benchmark": bench,
            "mode": mode,
            "sample": 0,
            "question": f"{bench}?",
            "answer": 1,
            "prefix": "",
            "response": "r",
            "code_blocks": [],
            "correct": correct,
            "used_code": used_code,
        }

    records = [rec("a", "cot", True), rec("a", "code", False), rec("a", "auto", False, used_code=True)]
    records += [rec("b", "cot", True), rec("b", "code", True), rec("b", "auto", True, used_code=True)]
    (tmp_path / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    data = page_data([tmp_path])
    flags = {(data["questions"][r["q"]][0], data["strings"][r["mode"]]): r["flags"] for r in rows_of(data)}
    # a: cot beats code, and auto used code -> decisive, and auto chose the worse; b: a tie -> nothing
    assert flags == {
        ("a", "cot"): FLAG_DECISIVE,
        ("a", "code"): FLAG_DECISIVE,
        ("a", "auto"): FLAG_DECISIVE | FLAG_WRONG_CHOICE,
        ("b", "cot"): 0,
        ("b", "code"): 0,
        ("b", "auto"): 0,
    }


def test_estep_page_data_shows_the_audit_subsample_and_advantages(runs):
    run = runs["estep"]
    rollouts = list(read_jsonl(run / "rollouts.jsonl"))
    train = {r["key"]: r for r in read_jsonl(run / "train.jsonl")}
    audit = {a["id"]: a for a in read_jsonl(run / "audit.jsonl")}
    data = page_data([run])
    assert data["sources"][0]["kind"] == "estep"
    page_audit = data["audit"][0]
    assert set(page_audit) == set(audit)
    for qid, a in audit.items():
        q0, q1, pi, s0, s1, n0, n1, chosen = page_audit[qid]
        assert (q0, q1, pi, s0, s1) == (a["Q"]["0"], a["Q"]["1"], a["pi_code"], a["s_star"]["0"], a["s_star"]["1"])
        assert (n0, n1, chosen) == (a["n"]["0"], a["n"]["1"], len(a["chosen"]))
    expected_adv = dict(zip([record_key(r) for r in rollouts], advantages(rollouts), strict=True))
    rows = rows_of(data)
    assert len(rows) == len(rollouts)
    for row, rec in zip(rows, rollouts, strict=True):
        key = record_key(rec)
        assert row["chosen"] == int(key in train)
        assert row["adv"] == pytest.approx(expected_adv[key], abs=1e-4)
        if key in train:
            assert row["adv"] == pytest.approx(train[key]["advantage"], abs=1e-4)
            assert row["c"] == train[key]["c"]
    assert sum(r["chosen"] for r in rows) == len(train) == 12


def test_training_run_layout_and_two_runs(tmp_path, runs):
    """A training run nests E-step and eval directories; two runs get A/B sources and 'runs differ' flags."""
    run_a = tmp_path / "train"
    shutil.copytree(runs["eval"], run_a / "iter-01" / "eval")
    shutil.copytree(runs["estep"], run_a / "iter-01" / "collect")
    (run_a / "iter-01" / "mstep").mkdir()
    data = page_data([run_a])
    assert [(s["name"], s["kind"]) for s in data["sources"]] == [("iter-01/collect", "estep"), ("iter-01/eval", "eval")]
    both = page_data([runs["eval"], runs["eval_b"]])
    assert [s["name"] for s in both["sources"]] == ["A: eval", "B: other"]
    rows = rows_of(both)
    # shift=1 flips cot correctness for every question (a vs a+1 parity); code and auto-with-code are unchanged
    for row in rows:
        mode = both["strings"][row["mode"]]
        qid = both["questions"][row["q"]][1]
        flips = mode == "cot" or (mode == "auto" and int(qid[1:]) >= 2)
        assert bool(row["flags"] & FLAG_RUNS_DIFFER) == flips, (mode, qid)


def test_page_is_self_contained_and_compresses(runs):
    data = page_data([runs["eval"]])
    plain, packed = render_page(data, compress=False), render_page(data, compress=True)
    for html in (plain, packed):
        assert not re.search(r"(src|href)\s*=\s*[\"']?(https?:)?//", html)  # nothing to fetch
        assert "<script" in html and html.count("</script>") == 2  # data cannot close its own tag
    body = re.search(r'data-encoding="gzip">([^<]*)</script>', packed).group(1)
    assert json.loads(gzip.decompress(base64.b64decode(body))) == data
    assert len(packed) < len(plain)


def test_runs_written_before_meta_and_durations_still_show(tmp_path, runs):
    run = shutil.copytree(runs["eval"], tmp_path / "old")
    samples = list(read_jsonl(run / "samples.jsonl"))
    for r in samples:
        del r["meta"]
        for b in r["code_blocks"]:
            b.pop("duration_s", None)
    (run / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in samples) + '{"id": "torn')
    data = page_data([run])  # the meta comes back from the benchmark file named in config.yaml
    assert {json.dumps(q[4], sort_keys=True) for q in data["questions"]} == {
        json.dumps({"family": f, "level": lv}, sort_keys=True)
        for f, lv in [("add", 1), ("mul", 1), ("sub", 1), ("add", 2), ("mul", 2), ("sub", 2)]
    }
    assert all(b[1] is None for row in rows_of(data) for b in row["blocks"])
    assert len(data["rows"]) == 18  # the torn last line (a writer still at work) is left out


def test_cli_writes_the_page_and_rejects_bad_input(tmp_path, runs):
    run = shutil.copytree(runs["eval"], tmp_path / "run")
    runner = CliRunner()
    result = runner.invoke(app, ["view", str(run), "--out", str(tmp_path / "page.html")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "page.html").read_text().startswith("<!doctype html>")
    result = runner.invoke(app, ["view", str(run)])
    assert result.exit_code == 0 and (run / "view.html").exists()
    (tmp_path / "empty").mkdir()
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "samples.jsonl").write_text('{"id": "x"}\n')
    for args, message in [
        (["view", str(tmp_path / "missing")], "no such run directory"),
        (["view", str(tmp_path / "empty")], "no samples.jsonl or rollouts.jsonl"),
        (["view", str(bad)], "lacks"),
    ]:
        result = runner.invoke(app, args)
        assert result.exit_code == 2 and message in result.output, result.output
        assert len(result.output.strip().splitlines()) == 1 and "Traceback" not in result.output
    with pytest.raises(DataError, match="not a rollout record"):
        write_view([bad])


# --- the page in a real browser: Debian's Chromium driven by Playwright (installed by `make test`) ---


@pytest.fixture(scope="module")
def browser():
    pytest.importorskip("playwright.sync_api", reason="playwright is a dev dependency: pip install -e .[dev]")
    if not (shutil.which("chromium") or shutil.which("chromium-browser")):
        pytest.skip("no chromium: `make test` installs it with apt-get where it can")
    from autocode4math.view import headless_chromium

    with headless_chromium() as b:
        yield b


def open_page(browser, path):
    """Load a page from disk; return it with the console errors and every URL it requested."""
    page = browser.new_page(viewport={"width": 1400, "height": 900})
    errors, requests = [], []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("request", lambda r: requests.append(r.url))
    page.goto(path.as_uri())
    page.wait_for_selector("body[data-ready]", timeout=20_000)
    return page, errors, requests


def shown(page) -> int:
    return int(page.get_attribute("#count", "data-count"))


def search(page, text: str) -> int:
    page.fill("#f-search", text)
    page.wait_for_selector(f"#count[data-search={json.dumps(text)}]", timeout=5_000)
    return shown(page)


def haystack(r) -> str:
    return "\n".join([str(r["id"]), r["question"], str(r["answer"]), str(r["pred"] or ""), r["response"]]).lower()


@pytest.mark.slow
def test_browser_filters_count_what_the_jsonl_says(tmp_path, runs, browser):
    samples = list(read_jsonl(runs["eval"] / "samples.jsonl"))
    right = {(r["mode"], r["id"]): r["correct"] for r in samples}
    decisive = {q for m, q in right if m == "cot" and right[("cot", q)] != right[("code", q)]}
    page, errors, requests = open_page(browser, write_view([runs["eval"]], tmp_path / "page.html"))
    assert shown(page) == len(samples) == 18
    cases = [
        ("mode", "code", lambda r: r["mode"] == "code"),
        ("mode", "cot", lambda r: r["mode"] == "cot"),
        ("correct", "1", lambda r: r["correct"]),
        ("correct", "0", lambda r: not r["correct"]),
        ("code", "1", lambda r: r["n_code_calls"] > 0),
        ("code", "0", lambda r: r["n_code_calls"] == 0),
        ("c", "1", lambda r: r["mode"] == "code" or r["used_code"]),
        ("status", "error", lambda r: any(b["status"] == "error" for b in r["code_blocks"])),
        ("status", "ok", lambda r: any(b["status"] == "ok" for b in r["code_blocks"])),
        ("meta-family", "mul", lambda r: r["meta"]["family"] == "mul"),
        ("meta-level", "2", lambda r: r["meta"]["level"] == 2),
        ("finish", "answer", lambda r: r["finish_reason"] == "answer"),
        ("disagree", "1", lambda r: r["id"] in decisive),
        (
            "disagree",
            "2",
            lambda r: r["mode"] == "auto" and r["id"] in decisive and r["used_code"] != right[("code", r["id"])],
        ),
    ]
    for field, value, keep in cases:
        page.select_option(f"#f-{field}", value)
        assert shown(page) == sum(map(keep, samples)) > 0, (field, value)
        page.select_option(f"#f-{field}", "")
    page.select_option("#f-mode", "auto")
    page.select_option("#f-correct", "0")
    assert shown(page) == sum(r["mode"] == "auto" and not r["correct"] for r in samples)
    page.click("#f-clear")
    for needle in ("What is 4 plus 10", "print(1 + 10)", "ZeroDivisionError", "NO SUCH TEXT"):
        assert search(page, needle) == sum(needle.lower() in haystack(r) for r in samples), needle
    # a code block and its output: the code-mode trajectory of q4, opened
    page.select_option("#f-mode", "code")
    assert search(page, "print(4 + 10)") == 1
    page.click(".traj-head")
    assert "print(4 + 10)" in page.inner_text(".transcript .code")
    tool = page.locator(".transcript .tool")
    assert tool.inner_text().split() == ["14", "```"] and "ok" in tool.get_attribute("data-label")
    assert page.inner_text(".transcript .prefix").strip() == CODE_PREFIX
    assert "mask 0" in tool.get_attribute("data-label")
    assert errors == [] and all(u.startswith(("file:", "data:", "blob:")) for u in requests), (errors, requests)


@pytest.mark.slow
def test_browser_two_runs_side_by_side_and_pages(tmp_path, runs, browser):
    b_samples = list(read_jsonl(runs["eval_b"] / "samples.jsonl"))
    path = tmp_path / "two.html"
    path.write_text(render_page(page_data([runs["eval"], runs["eval_b"]]), compress=True))  # the gzip path
    page, errors, _ = open_page(browser, path)
    assert shown(page) == 36
    page.select_option("#f-run", "1")
    assert shown(page) == len(b_samples)
    page.select_option("#f-run", "")
    page.select_option("#f-disagree", "4")
    # in each run: cot flips on all six questions, auto on the four it answers without code
    assert shown(page) == 2 * (6 + 4)
    page.select_option("#f-disagree", "")
    page.select_option("#page-size", "25")
    assert page.locator(".traj").count() == 25
    page.click("#next")
    assert page.locator(".traj").count() == 11 and "page 2 of 2" in page.inner_text("#page")
    page.click(".traj .cmp")
    columns = [page.locator(".col").nth(i).get_attribute("data-source") for i in range(page.locator(".col").count())]
    assert sorted(columns) == ["A: eval"] * 3 + ["B: other"] * 3  # three modes in each run
    page.select_option("#f-mode", "cot")
    assert page.locator(".col").count() == 2
    first = page.inner_text(".cmp-head")
    page.click("#cmp-next")
    assert page.inner_text(".cmp-head") != first and page.locator(".col").count() == 2
    assert errors == []


@pytest.mark.slow
def test_browser_estep_queries(tmp_path, runs, browser):
    rollouts = list(read_jsonl(runs["estep"] / "rollouts.jsonl"))
    audit = list(read_jsonl(runs["estep"] / "audit.jsonl"))
    page, errors, _ = open_page(browser, write_view([runs["estep"]], tmp_path / "estep.html"))
    page.select_option("#f-chosen", "1")
    assert shown(page) == sum(len(a["chosen"]) for a in audit)
    page.select_option("#f-chosen", "")
    page.click("#tab-queries")
    assert int(page.get_attribute("#query-count", "data-count")) == len(audit)
    cells = page.locator("tr.query").first.locator("td")
    qid = cells.nth(1).inner_text()
    row = next(a for a in audit if a["id"] == qid)
    expected = ["-" if row["Q"][c] is None else f"{row['Q'][c]:.2f}" for c in "01"]
    assert [cells.nth(i).inner_text() for i in (2, 3)] == expected
    page.locator("tr.query").first.click()
    assert shown(page) == sum(r["id"] == qid for r in rollouts)
    page.click(".traj-head")
    assert page.locator(".detail table.estep").count() == 1
    assert errors == []


def test_bench_view_times_a_page_made_under_a_relative_out_dir(tmp_path):
    """`autocode bench view` defaults to a relative --out (runs/bench-view); the browser needs an absolute URI.
    Its own process: the module's browser fixture holds Playwright's sync API in this one."""
    pytest.importorskip("playwright.sync_api", reason="playwright is a dev dependency: pip install -e .[dev]")
    if not (shutil.which("chromium") or shutil.which("chromium-browser")):
        pytest.skip("no chromium: `make test` installs it with apt-get where it can")
    cmd = [sys.executable, "-m", "autocode4math.cli", "bench", "view", "--trajectories", "30", "--chars", "200"]
    result = subprocess.run([*cmd, "--out", "bv"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "bv" / "run" / "samples.jsonl").exists() and "load" in result.stdout
