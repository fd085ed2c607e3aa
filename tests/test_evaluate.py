"""`autocode eval` end to end: a scripted model with known behaviour per mode, exact metrics, resume, CLI."""

from __future__ import annotations

import json
import re

import pytest
from typer.testing import CliRunner

from autocode4math.cli import app
from autocode4math.evaluate import EvalConfig, replace, run_eval, sampling_for
from autocode4math.fingerprint import ResumeError
from autocode4math.io import read_jsonl
from autocode4math.prompts import CODE_PREFIX
from autocode4math.rollout.scripted import ScriptedBackend
from autocode4math.sandbox import SandboxPool


def tiny_benchmark(path, count=4):
    rows = [{"id": f"q{a}", "question": f"What is {a} plus 10?", "answer": str(a + 10)} for a in range(count)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def responder(ctx: str) -> str:
    """cot is right only for even a; code always runs print(a + 10); auto uses code only when a < 2."""
    a = int(re.search(r"What is (\d+) plus 10", ctx).group(1))
    if "```output" in ctx:
        return f"The output shows it: \\boxed{{{ctx.rsplit('```output', 1)[1].split()[0]}}}"
    code = f"```python\nprint({a} + 10)\n```\n```output"
    if CODE_PREFIX in ctx:
        return code
    if "without writing code" in ctx or a >= 2:
        return f"{a} plus 10 is \\boxed{{{a + 10 + a % 2}}}."
    return code


@pytest.fixture(scope="module")
def pool():
    with SandboxPool(workers=2) as p:
        yield p


def test_metrics_match_the_scripted_behaviour(tmp_path, tiny_tokenizer, pool):
    cfg = EvalConfig(
        model="scripted",
        benchmarks=[],
        benchmark_files=[str(tiny_benchmark(tmp_path / "tiny.jsonl"))],
        out=str(tmp_path / "run"),
    )
    metrics = run_eval(cfg, backend=ScriptedBackend(tiny_tokenizer, responder), sandbox=pool, progress=False)
    m = metrics["benchmarks"]["tiny"]
    # cot: q0, q2 right -> 0.5 ; code: all right ; auto: q0, q1 by code, q2 by cot right, q3 wrong -> 0.75
    assert {k: v["accuracy"] for k, v in m["modes"].items()} == {"auto": 0.75, "code": 1.0, "cot": 0.5}
    assert m["modes"]["auto"]["code_use_rate"] == 0.5
    assert m["modes"]["code"]["mean_code_calls"] == 1.0
    assert m["modes"]["code"]["code_error_rate"] == 0.0
    assert m["modes"]["cot"]["code_error_rate"] is None
    assert m["union"] == 1.0
    # decisive questions: q1, q3 (code better); auto used code on q1 only -> 1/2
    assert m["selection"] == {
        "selection_accuracy": 0.5,
        "n_decisive": 2,
        "n_both": 2,
        "n_neither": 0,
        "n_auto_samples": 2,
    }
    assert metrics["sampling"] == {"tiny": {"n": 1, "temperature": 0.0}}
    out = tmp_path / "run"
    rows = list(read_jsonl(out / "samples.jsonl"))
    assert len(rows) == 12 and all("response" in r for r in rows)
    assert json.loads((out / "metrics.json").read_text())["benchmarks"]["tiny"]["union"] == 1.0
    report = (out / "report.md").read_text()
    assert "## tiny" in report and "selection accuracy 50.0%" in report and "plots/tiny.png" in report
    assert (out / "plots" / "tiny.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "plots" / "tiny_cost.png").read_bytes()[:4] == b"\x89PNG"
    # cost: every code block carries its sandbox time; cot never runs code; code mode makes one call per question
    assert all(b["duration_s"] > 0 for r in rows for b in r["code_blocks"])
    assert all(r["meta"] == {} for r in rows)
    assert m["modes"]["cot"]["mean_sandbox_s"] == 0.0 < m["modes"]["code"]["mean_sandbox_s"]
    cost = {r["mode"]: r for r in metrics["cost"]["tiny"]}
    assert cost["code"]["mean_code_calls"] == 1.0 and cost["cot"]["mean_code_calls"] == 0.0
    assert cost["code"]["pareto_mean_code_calls"]  # the only mode at 100%
    assert "accuracy versus cost" in report and "plots/tiny_cost.png" in report
    assert (out / "config.yaml").exists()


def test_resume_generates_only_missing_samples(tmp_path, tiny_tokenizer, pool):
    bench = tiny_benchmark(tmp_path / "tiny.jsonl")
    cfg = EvalConfig(model="scripted", benchmarks=[], benchmark_files=[str(bench)], out=str(tmp_path / "run"))
    run_eval(cfg, backend=ScriptedBackend(tiny_tokenizer, responder), sandbox=pool, progress=False)
    samples = tmp_path / "run" / "samples.jsonl"
    lines = samples.read_text().splitlines(keepends=True)
    samples.write_text("".join(lines[:5]) + lines[5][:20])  # killed while writing line 6
    seen = []
    backend = ScriptedBackend(tiny_tokenizer, lambda ctx: seen.append(ctx) or responder(ctx))
    metrics = run_eval(cfg, backend=backend, sandbox=pool, progress=False)
    rows = list(read_jsonl(samples))
    keys = [(r["mode"], r["id"], r["sample"]) for r in rows]
    assert len(keys) == 12 == len(set(keys))
    assert sum(backend.calls[:1]) == 7  # the 7 missing samples start together in the first round
    assert metrics["benchmarks"]["tiny"]["modes"]["auto"]["accuracy"] == 0.75
    backend = ScriptedBackend(tiny_tokenizer, responder)
    run_eval(cfg, backend=backend, sandbox=pool, progress=False)
    assert backend.calls == []  # nothing left to do
    with pytest.raises(ResumeError, match=r"temperature: null -> 0.7"):
        run_eval(replace(cfg, temperature=0.7), backend=backend, sandbox=pool, progress=False)
    run_eval(replace(cfg, limit=2), backend=backend, sandbox=pool, progress=False)  # a subset is fine
    run_eval(replace(cfg, batch_size=3, modes=["cot"]), backend=backend, sandbox=pool, progress=False)
    assert backend.calls == []
    assert "temperature: null" in (tmp_path / "run" / "config.yaml").read_text()  # the refused run wrote nothing


def test_resume_refuses_samples_of_changed_questions_and_other_models(tmp_path, tiny_tokenizer, pool):
    bench = tiny_benchmark(tmp_path / "tiny.jsonl")
    cfg = EvalConfig(model="scripted", benchmarks=[], benchmark_files=[str(bench)], out=str(tmp_path / "run"))
    run_eval(cfg, backend=ScriptedBackend(tiny_tokenizer, responder), sandbox=pool, progress=False)
    rows = [json.loads(line) for line in bench.read_text().splitlines()]
    for field, value in (("question", "What is 1 plus 11?"), ("answer", "12")):  # same id, other content
        bench.write_text("".join(json.dumps({**r, field: value} if r["id"] == "q1" else r) + "\n" for r in rows))
        with pytest.raises(ResumeError, match=r"differ from tiny's now \(e.g. id q1\)"):
            run_eval(cfg, backend=ScriptedBackend(tiny_tokenizer, responder), sandbox=pool, progress=False)
    backend = ScriptedBackend(tiny_tokenizer, responder)
    metrics = run_eval(cfg, backend=backend, sandbox=pool, progress=False, overwrite=True)
    assert sum(backend.calls[:1]) == 3  # only q1's three modes were redone
    assert metrics["benchmarks"]["tiny"]["modes"]["code"]["n_samples"] == 4
    with pytest.raises(ResumeError, match=r"model: \"name:scripted\" -> \"name:other\""):
        run_eval(replace(cfg, model="other"), backend=backend, sandbox=pool, progress=False)


def test_paper_sampling_defaults_and_overrides():
    cfg = EvalConfig(model="m")
    assert sampling_for("aime24", cfg) == (64, 0.6)
    assert sampling_for("amc23", cfg) == (64, 0.6)
    assert sampling_for("gsm8k", cfg) == (1, 0.0)
    assert sampling_for("aime24", EvalConfig(model="m", n=4, temperature=1.0)) == (4, 1.0)
    assert sampling_for("math500", EvalConfig(model="m", temperature=0.0)) == (1, 0.0)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"modes": ["magic"]}, "modes"),
        ({"backend": "x"}, "backend"),
        ({"n": 0}, "n must"),
        ({"benchmarks": []}, "at least one benchmark"),
        ({"limit": 0}, "limit"),
    ],
)
def test_config_checks(kwargs, match):
    with pytest.raises(ValueError, match=match):
        EvalConfig(model="m", **kwargs)


@pytest.mark.slow
def test_cli_eval_on_the_tiny_model(tmp_path, tiny_model_dir):
    bench = tiny_benchmark(tmp_path / "tiny.jsonl", count=2)
    args = [
        "eval",
        "--model",
        str(tiny_model_dir),
        "--benchmark-file",
        str(bench),
        "--modes",
        "auto,cot,code",
        "--out",
        str(tmp_path / "run"),
        "--set",
        "max_new_tokens=8",
        "--set",
        "batch_size=3",
    ]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    rows = list(read_jsonl(tmp_path / "run" / "samples.jsonl"))
    assert len(rows) == 6
    assert all(len(r["response_ids"]) <= 8 for r in rows)
    assert "tiny" in result.output
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert set(metrics["benchmarks"]["tiny"]["modes"]) == {"auto", "cot", "code"}


def test_cli_rejects_bad_options(tmp_path):
    result = CliRunner().invoke(app, ["eval", "--model", "m", "--modes", "magic", "--out", str(tmp_path)])
    assert result.exit_code != 0
    assert "modes" in result.output


def test_breakdown_by_a_meta_key(tmp_path, tiny_tokenizer, pool):
    rows = [
        {"id": f"q{a}", "question": f"What is {a} plus 10?", "answer": str(a + 10), "family": ["even", "odd"][a % 2]}
        for a in range(4)
    ]
    path = tmp_path / "fam.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = EvalConfig(model="scripted", benchmarks=[], benchmark_files=[str(path)], out=str(tmp_path / "run"))
    metrics = run_eval(cfg, backend=ScriptedBackend(tiny_tokenizer, responder), sandbox=pool, progress=False)
    table = metrics["breakdown"]["fam"]["family"]
    assert table["even"]["auto_accuracy"] == 1.0 and table["even"]["selection_accuracy"] is None
    # odd: cot always wrong, code right; auto uses code on q1 (right) and not on q3 (wrong)
    assert table["odd"]["cot_accuracy"] == 0.0 and table["odd"]["code_accuracy"] == 1.0
    assert table["odd"]["auto_accuracy"] == 0.5 and table["odd"]["selection_accuracy"] == 0.5
    assert table["odd"]["n_questions"] == 2 and table["odd"]["union"] == 1.0
    assert "### fam by family" in (tmp_path / "run" / "report.md").read_text()
    assert "subject" not in metrics["breakdown"]["fam"]


def test_eval_takes_a_shipped_checkpoint_by_name_and_warns_about_template_and_context(tmp_path, pool):
    """toy-base resolves as in `train`; it has no chat template and 512 positions, so both warnings fire."""
    from autocode4math.rollout import SHIPPED_CHECKPOINTS

    toy = tmp_path / "toy.jsonl"
    toy.write_text(json.dumps({"id": "t", "question": "What is 2 + 3?", "answer": "5"}) + "\n")
    cfg = EvalConfig(model="toy-base", benchmarks=[], benchmark_files=[str(toy)], modes=["cot"], max_new_tokens=600)
    cfg = replace(cfg, out=str(tmp_path / "e"))
    with pytest.warns(UserWarning) as caught:
        metrics = run_eval(cfg, sandbox=pool, progress=False)
    messages = [str(w.message) for w in caught]
    assert any("no chat template: prompts use the plain template" in m for m in messages), messages
    assert any("goes past the model's 512 positions" in m for m in messages), messages
    assert metrics["model"] == str(SHIPPED_CHECKPOINTS / "toy-base")
    [record] = read_jsonl(tmp_path / "e" / "samples.jsonl")
    assert record["n_prompt_tokens"] + len(record["response_ids"]) <= 512
