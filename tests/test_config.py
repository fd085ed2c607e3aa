import re
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
    with pytest.raises(ConfigError, match=r"^--set inner.lrr=0.5: unknown field inner.lrr; did you mean inner.lr\?"):
        load_config(Outer, None, ["inner.lrr=0.5"])


def test_post_init_checks_run():
    with pytest.raises(ConfigError, match="lr must be positive"):
        load_config(Outer, None, ["inner.lr=-1"])


def test_a_number_given_to_a_str_field_keeps_its_text():
    assert load_config(Outer, None, ["name=78"]).name == "78"
    assert load_config(Outer, None, ["inner.steps=3"]).inner.steps == 3


@dataclass
class Typed:
    """Every kind of hint the project's configs use."""

    count: int = 1
    rate: float = 0.5
    flag: bool = False
    name: str = "x"
    limit: int | None = None
    tags: list[str] = field(default_factory=lambda: ["a"])
    env: dict[str, str] = field(default_factory=dict)
    inner: Inner = field(default_factory=lambda: Inner(lr=0.25))


@pytest.mark.parametrize(
    ("override", "field_name", "expected"),
    [
        ("count=2.5", "count", "int"),
        ("count=true", "count", "int"),
        ("count=[1]", "count", "int"),
        ("rate=abc", "rate", "float"),
        ("rate=no", "rate", "float"),
        ("flag=maybe", "flag", "bool"),
        ("flag=2", "flag", "bool"),
        ("name=[1, 2]", "name", "str"),
        ("name={a: 1}", "name", "str"),
        ("limit=many", "limit", "int or null"),
        ("tags={a: 1}", "tags", "list"),
        ("env=[1]", "env", "dict"),
        ("inner=3", "inner", "Inner"),
        ("inner.steps=ten", "inner.steps", "int"),
        ("inner.lr=1e-3x", "inner.lr", "float"),
    ],
)
def test_a_value_of_the_wrong_type_names_field_value_type_and_source(override, field_name, expected):
    with pytest.raises(ConfigError) as e:
        load_config(Typed, None, [override])
    message = str(e.value)
    value = override.split("=", 1)[1]
    assert message.startswith(f"--set {override}: {field_name} = ")
    assert f"expected {expected}" in message and value.split(",")[0].strip("[{") in message
    assert "\n" not in message


def test_typed_values_are_taken_as_values_and_override_set():
    cfg = load_config(Typed, None, ["name=from-set", "count=3"], {"name": "run #2: a, b", "inner.steps": 7})
    assert (cfg.name, cfg.count, cfg.inner.steps) == ("run #2: a, b", 3, 7)
    with pytest.raises(ConfigError, match=r"^--count: count = 'x': expected int"):
        load_config(Typed, None, [], {"count": "x"})


def test_conventions_on_top_of_the_types():
    cfg = load_config(Typed, None, ["name=007", "tags=p, q,", "count=2.0", "limit=null", "inner.steps=4"])
    assert (cfg.name, cfg.tags, cfg.count, cfg.limit) == ("007", ["p", "q"], 2, None)
    # a section given in part keeps its default factory's other values (lr 0.25, not Inner's class default)
    assert cfg.inner == Inner(lr=0.25, steps=4)
    with pytest.raises(ConfigError, match=r"unknown field inner\.stpes; did you mean inner\.steps\?"):
        load_config(Typed, None, ["inner.stpes=1"])


def test_a_nested_section_keeps_the_defaults_of_the_enclosing_default():
    """TrainConfig's E-step rollouts sample at temperature 1.0: overriding another rollout field keeps it."""
    from autocode4math.em import TrainConfig

    cfg = load_config(TrainConfig, None, ["estep.rollout.max_new_tokens=99"])
    assert (cfg.estep.rollout.max_new_tokens, cfg.estep.rollout.temperature, cfg.estep.rollout.top_p) == (99, 1.0, 0.9)


def test_preset_errors_name_the_file_and_line(tmp_path):
    preset = tmp_path / "p.yaml"
    preset.write_text("name: base\ninner:\n  steps: 5\n  lr: fast\n")
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(preset))}:4: inner\.lr = 'fast': expected float"):
        load_config(Outer, preset)
    preset.write_text("name: base\ninner:\n  steps: [5, 6\n")
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(preset))}:4:1: not valid YAML .*at line 3"):
        load_config(Outer, preset)
    preset.write_text("name: base\n  bad: indent\n")
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(preset))}:2:\d+: not valid YAML"):
        load_config(Outer, preset)
    preset.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(Outer, preset)
    with pytest.raises(ConfigError, match="cannot read the config file"):
        load_config(Outer, tmp_path / "missing.yaml")
    preset.write_text("inner:\n  lr: -2\n")
    with pytest.raises(ConfigError, match=rf"^inner: lr must be positive \(given: {re.escape(str(preset))}:2\)"):
        load_config(Outer, preset)


@pytest.mark.parametrize("override", ["inner.lr=[1,", "name=a: b: c", "name=@x", "name={", "nokey"])
def test_an_override_that_is_not_yaml_or_not_key_value_is_a_config_error(override):
    with pytest.raises(ConfigError, match=rf"^--set {re.escape(override)}: "):
        load_config(Outer, None, [override])
