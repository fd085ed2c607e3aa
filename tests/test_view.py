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


def one_line(output: str) -> str:
    """CLI output with rich's box drawing and line wrapping removed."""
    return " ".join(re.sub(r"[│╭╮╰╯─]", " ", output).split())


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
        assert result.exit_code == 2 and message in one_line(result.output), result.output
        assert "Traceback" not in result.output
    with pytest.raises(DataError, match="not a rollout record"):
        write_view([bad])
