"""The docs name what exists: module tree, preset and package paths in the README, docs and CLI help."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from autocode4math.config import load_config
from autocode4math.em import TrainConfig

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "src" / "autocode4math"
TEXTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), PACKAGE / "cli.py", PACKAGE / "config.py"]


def test_the_architecture_tree_lists_exactly_the_modules():
    text = (ROOT / "docs" / "architecture.md").read_text()
    tree = text.split("```", 2)[1]
    named = set(re.findall(r"\b(\w+\.py)\b", tree))
    modules = {p.name for p in PACKAGE.glob("*.py")} | {p.name for p in (PACKAGE / "rollout").glob("*.py")}
    assert named - modules == set(), "the tree names modules that do not exist"
    assert modules - named == set(), "modules missing from the tree in docs/architecture.md"


@pytest.mark.parametrize("text", TEXTS, ids=lambda p: p.name)
def test_every_preset_and_package_path_named_exists(text):
    paths = re.findall(r"(?:src/autocode4math/|\bpresets/)[\w./{},-]*[\w}]", text.read_text())
    for path in (p for p in paths if not re.search(r"[A-Z]{3,}", p)):  # PRESET.yaml: a placeholder
        rel = path.removeprefix("src/autocode4math/")
        for expanded in _braces(rel):
            assert (PACKAGE / expanded).exists(), f"{text.name} names {path}, which does not exist"


def _braces(path: str) -> list[str]:
    """a/{b,c}/d -> [a/b/d, a/c/d]."""
    match = re.search(r"\{([^}]*)\}", path)
    if not match:
        return [path]
    head, tail = path[: match.start()], path[match.end() :]
    return [e for part in match.group(1).split(",") for e in _braces(head + part + tail)]


@pytest.mark.parametrize("preset", sorted((PACKAGE / "presets" / "train").glob("*.yaml")), ids=lambda p: p.name)
def test_train_presets_load_and_open_with_their_command(preset):
    config = load_config(TrainConfig, preset)
    assert config.model and config.iterations >= 1
    assert preset.read_text().startswith(f"# autocode train --config src/autocode4math/presets/train/{preset.name}")
