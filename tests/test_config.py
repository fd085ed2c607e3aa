from dataclasses import dataclass, field

import pytest

from autocode4math.config import ConfigError, load_config, parse_overrides


@dataclass
class Inner:
    lr: float = 1e-5
    steps: int = 10

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise ValueError("lr must be positive")


@dataclass
class Outer:
    name: str = "run"
    inner: Inner = field(default_factory=Inner)


def test_overrides_parse_yaml_values():
    assert parse_overrides(["a.b=1e-4", "c=true", "d=[1, 2]"]) == {"a": {"b": 1e-4}, "c": True, "d": [1, 2]}


def test_preset_then_overrides(tmp_path):
    preset = tmp_path / "p.yaml"
    preset.write_text("name: base\ninner:\n  steps: 5\n")
    cfg = load_config(Outer, preset, ["inner.lr=0.5"])
    assert cfg == Outer(name="base", inner=Inner(lr=0.5, steps=5))


def test_unknown_key_is_an_error():
    with pytest.raises(ConfigError, match="unknown keys"):
        load_config(Outer, None, ["inner.lrr=0.5"])


def test_post_init_checks_run():
    with pytest.raises(ConfigError, match="lr must be positive"):
        load_config(Outer, None, ["inner.lr=-1"])


def test_a_number_given_to_a_str_field_keeps_its_text():
    assert load_config(Outer, None, ["name=78"]).name == "78"
    assert load_config(Outer, None, ["inner.steps=3"]).inner.steps == 3
