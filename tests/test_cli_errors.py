"""What a user sees for bad input through the real `autocode` CLI: one line, exit code 2, no traceback."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from autocode4math.cli import app

STAGE = ["--model", "m", "--queries", "toy", "--out", "unused"]


def run(args: list[str]):
    return CliRunner().invoke(app, args)


def assert_usage_error(result, *needles: str) -> str:
    """Exit code 2, no traceback, exactly one non-empty output line naming every needle; return that line."""
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output
    assert len(lines) == 1, result.output
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


@pytest.mark.parametrize(
    ("args", "field_name", "value", "expected"),
    [
        (["train", "--set", "estep.k=2.5"], "estep.k", "2.5", "expected int"),
        (["train", "--set", "mstep.lr=abc"], "mstep.lr", "'abc'", "expected float"),
        (["train", "--set", "mstep.bf16=maybe"], "mstep.bf16", "'maybe'", "expected bool"),
        (["train", "--set", "estep.k=true"], "estep.k", "True", "expected int"),
        (["train", "--set", "estep.rollout.temperature=hot"], "estep.rollout.temperature", "'hot'", "expected float"),
        (["train", "--set", "eval.limit=all"], "eval.limit", "'all'", "expected int or null"),
        (["train", "--set", "estep.prompt.use_chat_template=sometimes"], "use_chat_template", "'sometimes'", "bool"),
        (["eval", "--model", "m", "--set", "max_new_tokens=1.5"], "max_new_tokens", "1.5", "expected int"),
        (["eval", "--model", "m", "--set", "top_p=[1]"], "top_p", "[1]", "expected float"),
        (["eval", "--model", "m", "--set", "temperature=warm"], "temperature", "'warm'", "expected float or null"),
        (["estep", *STAGE, "--set", "k=2.5"], "k", "2.5", "expected int"),
        (["estep", *STAGE, "--set", "rollout.top_p=x"], "rollout.top_p", "'x'", "expected float"),
        (["mstep", "--model", "m", "--data", "d", "--out", "o", "--set", "bf16=maybe"], "bf16", "'maybe'", "bool"),
        (["mstep", "--model", "m", "--data", "d", "--out", "o", "--set", "epochs=1e0x"], "epochs", "'1e0x'", "float"),
        (["demo", "--set", "k=x"], "k", "'x'", "expected int"),
        (["demo", "--full", "--set", "lr=fast"], "lr", "'fast'", "expected float"),
        (["demo", "--set", "methods={em: 1}"], "methods", "{'em': 1}", "expected list"),
        (["toy", "pretrain", "--set", "steps=1.5"], "steps", "1.5", "expected int"),
        (["toy", "pretrain", "--set", "model.num_layers=four"], "model.num_layers", "'four'", "expected int"),
    ],
)
def test_a_badly_typed_value_is_a_one_line_usage_error(args, field_name, value, expected):
    line = assert_usage_error(run(args), field_name, value, expected)
    assert f"--set {args[-1]}" in line  # names where the value came from


@pytest.mark.parametrize(
    "args",
    [
        ["train", "--set", "mstep.lr=[1,"],
        ["eval", "--model", "m", "--set", "modes=a: b: c"],
        ["demo", "--set", "k={"],
        ["toy", "pretrain", "--set", "steps=@1"],
    ],
)
def test_a_yaml_syntax_error_in_an_override_is_a_one_line_usage_error(args):
    assert_usage_error(run(args), f"--set {args[-1]}", "not valid YAML")


@pytest.mark.parametrize(
    ("command", "text", "needles"),
    [
        (["train"], "iterations: 2\nmstep:\n  lr: abc\n", (":3:", "mstep.lr", "'abc'", "expected float")),
        (["train"], "iterations: 2\nestep:\n  k: [1, 2\n", (":4:", "not valid YAML", "at line 3")),
        (["train"], "estep:\n  kk: 3\n", (":2:", "unknown field estep.kk", "did you mean estep.k?")),
        (["eval", "--model", "m"], "limit: -4\n", ("limit must be >= 1", ":1")),
        (["estep", *STAGE], "alpha: high\n", (":1:", "alpha", "expected float")),
        (["mstep", "--model", "m", "--data", "d", "--out", "o"], "schedule: [cosine\n", ("not valid YAML",)),
        (["toy", "pretrain"], "model:\n  max_positions: 5.5\n", (":2:", "model.max_positions", "expected int")),
    ],
)
def test_preset_errors_name_the_file_and_line(tmp_path, command, text, needles):
    preset = tmp_path / "preset.yaml"
    preset.write_text(text)
    assert_usage_error(run([*command, "--config", str(preset)]), str(preset), *needles)


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (["eval", "--model", "m", "--limit", "-3"], ("limit must be >= 1", "--limit")),
        (["eval", "--model", "m", "--n", "0"], ("n must be >= 1", "--n")),
        (["train", "--iterations", "0"], ("iterations must be >= 1", "--iterations")),
        (["train", "--method", "ppo"], ("method must be one of", "--method")),
        (["estep", *STAGE, "--limit", "-1"], ("--limit must be >= 0",)),
        (["demo", "--set", "methods=em,magic"], ("unknown methods ['magic']",)),
        (["train", "--set", "nonsense=1"], ("unknown field nonsense",)),
        (["exec", "--timeout", "0"], ("timeout_s must be a positive number", "(given: --timeout)")),
        (["exec", "--memory-mb", "-5"], ("memory_mb must be a positive integer", "(given: --memory-mb)")),
    ],
)
def test_an_out_of_range_option_is_a_one_line_usage_error(args, needles):
    assert_usage_error(run(args), *needles)


def test_typed_options_reach_the_config_as_values(monkeypatch):
    """`--out "run #2"` used to become `run` (re-serialised into a YAML `--set`, where # starts a comment)."""
    import autocode4math.demo as demo
    import autocode4math.em as em
    import autocode4math.evaluate as evaluate
    import autocode4math.toymodel as toymodel

    seen = {}
    monkeypatch.setattr(em, "train", lambda cfg, **kw: seen.setdefault("train", cfg) and [])
    monkeypatch.setattr(evaluate, "run_eval", lambda cfg, **kw: seen.setdefault("eval", cfg))
    monkeypatch.setattr(
        demo, "run_demo", lambda cfg, **kw: seen.setdefault("demo", cfg) and {"seconds": 0, "targets": {}}
    )
    monkeypatch.setattr(toymodel, "pretrain", lambda cfg, log, overwrite: seen.setdefault("pretrain", cfg))
    odd = "runs/run #2: {a, b} [x]"
    for args in (
        ["train", "--out", odd, "--model", "yes", "--queries", "null", "--set", "out=ignored"],
        ["eval", "--out", odd, "--model", "yes", "--benchmarks", "toy", "--modes", "cot"],
        ["demo", "--full", "--out", odd],
        ["toy", "pretrain", "--out-dir", odd, "--seed", "3"],
    ):
        assert run(args).exit_code == 0, args
    assert seen["train"].out == seen["eval"].out == seen["demo"].out == seen["pretrain"].out_dir == odd
    assert (seen["train"].model, seen["train"].queries) == ("yes", "null")
    assert (seen["eval"].model, seen["eval"].benchmarks, seen["eval"].modes) == ("yes", ["toy"], ["cot"])
    assert seen["demo"].queries == 400 and seen["pretrain"].seed == 3  # --full's sizes kept under the typed --out


def _no_hub(monkeypatch):
    """Any attempt to load a model through transformers fails the test."""
    import transformers

    def refuse(*args, **kwargs):
        raise AssertionError("a model load (and so a Hub lookup) was attempted")

    for cls in (transformers.AutoTokenizer, transformers.AutoModelForCausalLM):
        monkeypatch.setattr(cls, "from_pretrained", refuse)


@pytest.mark.parametrize("model", ["./nope", "/no/such/ckpt", "runs/em/iter-01/model", "ckpts/x/", "~/no-such-ckpt"])
@pytest.mark.parametrize(
    "command",
    [["eval", "--benchmarks", "toy", "--out", "o", "--model"], ["train", "--out", "o", "--model"],
     ["estep", "--queries", "toy", "--out", "o", "--model"], ["mstep", "--data", "d.jsonl", "--out", "o", "--model"]],
)  # fmt: skip
def test_a_missing_model_directory_is_named_before_any_hub_lookup(tmp_path, monkeypatch, command, model):
    monkeypatch.chdir(tmp_path)
    _no_hub(monkeypatch)
    assert_usage_error(run([*command, model]), f"model '{model}': directory does not exist", "toy-base")
    assert not (tmp_path / "o").exists()  # nothing was written either


@pytest.mark.parametrize(
    ("command", "source"),
    [(["eval", "--model", "toy-base", "--benchmarks"], "gsm9k"), (["eval", "--model", "toy-base", "--benchmarks"],
     "toy,math-500"), (["train", "--model", "toy-base", "--queries"], "GSM8K"),
     (["estep", "--model", "toy-base", "--out", "o", "--queries"], "aime2024")],
)  # fmt: skip
def test_an_unknown_benchmark_name_gets_did_you_mean(tmp_path, monkeypatch, command, source):
    monkeypatch.chdir(tmp_path)
    line = assert_usage_error(run([*command, source]), "unknown benchmark", "did you mean")
    assert not (tmp_path / "o").exists(), line


def test_bad_benchmark_files_are_one_line_errors_naming_file_and_line(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    files = {
        "arr.jsonl": ('[{"question": "a", "answer": "1"}]\n', "arr.jsonl:1: ", "JSON array"),
        "cut.jsonl": ('{"question": "a", "answer": "1"}\n{"question": "b", "ans\n', "cut.jsonl:2: ", "column 19"),
        "noq.jsonl": ('{"q": "a", "answer": "1"}\n', "noq.jsonl:1: no question field", "--question-field"),
        "sol.jsonl": ('{"problem": "a", "solution": "no box"}\n', "sol.jsonl:1: no answer field", "--answer-field"),
    }
    for name, (text, *needles) in files.items():
        (tmp_path / name).write_text(text)
        for command in (["eval", "--model", "toy-base", "--benchmark-file"], ["train", "--queries"]):
            assert_usage_error(run([*command, name]), *needles)
    assert_usage_error(run(["eval", "--model", "toy-base", "--benchmark-file", "gone.jsonl"]), "gone.jsonl: no such")


def test_field_options_reach_the_loader(tmp_path, monkeypatch):
    import autocode4math.em as em
    import autocode4math.evaluate as evaluate

    seen = {}
    monkeypatch.setattr(em, "train", lambda cfg, **kw: seen.setdefault("train", cfg) and [])
    monkeypatch.setattr(evaluate, "run_eval", lambda cfg, **kw: seen.setdefault("eval", cfg))
    names = ["--question-field", "text", "--answer-field", "gold", "--id-field", "key"]
    assert run(["eval", "--model", "m", "--benchmark-file", "f.jsonl", *names]).exit_code == 0
    assert run(["train", "--queries", "f.jsonl", *names]).exit_code == 0
    for cfg in seen.values():
        assert (cfg.fields.question, cfg.fields.answer, cfg.fields.id) == ("text", "gold", "key")
    rows = tmp_path / "mine.jsonl"
    rows.write_text('{"text": "1+1?", "gold": "2", "key": "k1"}\n')
    result = run(["estep", "--model", "./nope", "--queries", str(rows), "--out", "o", *names[:2]])
    assert_usage_error(result, "directory does not exist")  # the fields were accepted; the model comes first


@pytest.mark.parametrize("stage", ["base", "sft"])
def test_toy_pretrain_never_replaces_a_checkpoint_by_accident(tmp_path, monkeypatch, stage):
    """The README's `autocode toy pretrain --stage base` used to overwrite the shipped toy-base (1,000 steps)."""
    from autocode4math.rollout import SHIPPED_CHECKPOINTS

    monkeypatch.chdir(tmp_path)
    shipped = SHIPPED_CHECKPOINTS / f"toy-{stage}"
    before = (shipped / "model.safetensors").stat().st_mtime_ns
    for args in (["--out-dir", str(shipped)], ["--set", f"out_dir={shipped}"]):
        result = run(["toy", "pretrain", "--stage", stage, *args])
        assert_usage_error(result, "already holds a checkpoint", "--overwrite")
    assert (shipped / "model.safetensors").stat().st_mtime_ns == before
    mine = tmp_path / "runs" / f"toy-{stage}"
    mine.mkdir(parents=True)
    (mine / "config.json").write_text("{}")  # the default output directory, from an earlier run
    assert_usage_error(run(["toy", "pretrain", "--stage", stage]), f"runs/toy-{stage} already holds a checkpoint")
