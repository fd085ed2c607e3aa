"""Stage fingerprints: settings as dotted keys, input identities, and the guard that refuses mixed resumes."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import pytest

from autocode4math.benchmarks import Problem
from autocode4math.fingerprint import (
    ResumeError,
    Stage,
    differences,
    file_digest,
    guard,
    model_identity,
    problems_digest,
    settings_of,
)


@dataclass
class Inner:
    temperature: float = 1.0
    max_active: int = 64


@dataclass
class Outer:
    k: int = 8
    batch_size: int = 16
    names: list[str] = field(default_factory=lambda: ["a", "b"])
    rollout: Inner = field(default_factory=Inner)
    sandbox: Inner = field(default_factory=Inner)


def test_settings_are_dotted_and_leave_out_whole_subtrees():
    flat = settings_of(Outer(), prefix="estep.", leave_out=("batch_size", "rollout.max_active", "sandbox"))
    assert flat == {"estep.k": 8, "estep.names": ["a", "b"], "estep.rollout.temperature": 1.0}


def test_differences_name_each_changed_added_and_removed_key():
    old = {"k": 8, "lr": 0.001, "gone": True}
    new = {"k": 4, "lr": 0.001, "added": "x"}
    assert differences(old, new) == ['added: unset -> "x"', "gone: true -> unset", "k: 8 -> 4"]
    assert differences(new, dict(new)) == []


def _stage(tmp_path, **settings):
    return Stage(tmp_path / "stage", "E-step", {"k": 8, "model": "sha256:aa", **settings}, ("rollouts.jsonl", "plots"))


def test_guard_records_then_resumes_matching_results(tmp_path):
    stage = _stage(tmp_path)
    assert guard(stage) is False
    (stage.directory / "rollouts.jsonl").write_text("{}\n")
    assert guard(_stage(tmp_path)) is False  # same settings: resume
    assert (stage.directory / "rollouts.jsonl").exists()
    recorded = json.loads((stage.directory / "fingerprint.json").read_text())
    assert recorded["settings"] == stage.settings and recorded["stage"] == "E-step"


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"k": 4}, r"k: 8 -> 4"),
        ({"model": "sha256:bb"}, r"model: \"sha256:aa\" -> \"sha256:bb\""),
        ({"x": 1}, "x: unset"),
    ],
)
def test_guard_refuses_results_made_with_other_settings(tmp_path, change, named):
    guard(_stage(tmp_path))
    (tmp_path / "stage" / "rollouts.jsonl").write_text("{}\n")
    with pytest.raises(ResumeError, match=named) as info:
        guard(_stage(tmp_path, **change))
    assert "another --out" in str(info.value) and "--overwrite" in str(info.value)
    assert (tmp_path / "stage" / "rollouts.jsonl").exists()  # refusing touches nothing


def test_overwrite_discards_only_the_stage_results(tmp_path):
    guard(_stage(tmp_path))
    d = tmp_path / "stage"
    (d / "rollouts.jsonl").write_text("{}\n")
    (d / "plots").mkdir()
    (d / "plots" / "a.png").write_bytes(b"x")
    (d / "notes.txt").write_text("the user's own file")
    assert guard(_stage(tmp_path, k=4), overwrite=True) is True
    assert sorted(p.name for p in d.iterdir()) == ["fingerprint.json", "notes.txt"]
    assert json.loads((d / "fingerprint.json").read_text())["settings"]["k"] == 4


def test_new_settings_before_any_result_need_no_overwrite(tmp_path):
    guard(_stage(tmp_path))  # recorded, then killed before the first result
    assert guard(_stage(tmp_path, k=4)) is False
    assert json.loads((tmp_path / "stage" / "fingerprint.json").read_text())["settings"]["k"] == 4


def test_results_without_a_fingerprint_are_not_trusted(tmp_path):
    (tmp_path / "stage").mkdir()
    (tmp_path / "stage" / "rollouts.jsonl").write_text("{}\n")
    with pytest.raises(ResumeError, match=r"rollouts.jsonl\) without a fingerprint"):
        guard(_stage(tmp_path))
    assert guard(_stage(tmp_path), overwrite=True) is True
    assert not (tmp_path / "stage" / "rollouts.jsonl").exists()


def test_model_identity_follows_weights_and_config_not_other_files(tmp_path):
    d = tmp_path / "model"
    d.mkdir()
    (d / "config.json").write_text('{"hidden_size": 8}')
    (d / "model.safetensors").write_bytes(b"\x00" * 64)
    first = model_identity(d)
    (d / "README.md").write_text("notes")
    assert model_identity(d) == first
    (d / "model.safetensors").write_bytes(b"\x00" * 63 + b"\x01")  # one weight byte differs
    second = model_identity(d)
    assert second != first and second.startswith("sha256:")
    (d / "config.json").write_text('{"hidden_size": 9}')
    assert model_identity(d) not in (first, second)
    assert model_identity("Qwen/Qwen2.5-0.5B") == "name:Qwen/Qwen2.5-0.5B"


def test_content_digests_of_files_and_problems(tmp_path):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text('{"x": 1}\n')
    b.write_text('{"x": 1}\n')
    assert file_digest(a) == file_digest(b)
    b.write_text('{"x": 2}\n')
    assert file_digest(a) != file_digest(b)
    problems = [Problem("1", "What is 2+2?", "4", "toy", {}), Problem("2", "What is 3+3?", "6", "toy", {})]
    same = [Problem("1", "What is 2+2?", "4", "toy", {"family": "x"}), problems[1]]
    assert problems_digest(problems) == problems_digest(same)  # meta does not change a rollout
    for changed in (
        [Problem("1", "What is 2+3?", "4", "toy", {}), problems[1]],
        [Problem("1", "What is 2+2?", "5", "toy", {}), problems[1]],
        problems[::-1],
        problems[:1],
    ):
        assert problems_digest(changed) != problems_digest(problems)
