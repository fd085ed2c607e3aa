"""Stage fingerprints: a resumed stage is provably the stage its settings describe.

Every stage of the pipeline (E-step, RL collection, M-step, evaluation; a demo is made of these)
writes its results into its own directory and, run again, resumes from them. Before it reuses
anything, `guard` compares a fingerprint of what determines the stage's output with the one recorded
in the directory (`fingerprint.json`):

- its settings: the stage's config as dotted keys (`estep.k`, `rollout.temperature`), minus the
  fields that cannot change the output (output directory, batch sizes, worker counts, checkpoint
  frequency), which each stage names, so a run may be resumed with another batch size;
- its inputs, by content: the problems it rolls out (`problems_digest`), the data file it trains on
  (`file_digest`), the model it starts from (`model_identity`: a hash of a checkpoint's config and
  weights; inside one training run, the digest of the stage that produced the model).

Results recorded under another fingerprint, or results without one (written by an older version),
are never silently reused: `guard` raises `ResumeError` naming the settings that differ and how to
start fresh, or, with `overwrite=True`, deletes them and starts the stage over. A stage that has
not written any result yet simply records the new fingerprint. The fingerprint is written (atomically)
before the stage writes its first result, so every result file is covered by the record next to it.

Deliberately simplified: a hub id or a served model name is identified by its name (the weights
behind it are not hashed); a setting added to a config in a later version differs from a run that
did not record it, so such runs refuse to resume until started fresh.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from autocode4math.config import ConfigError
from autocode4math.io import read_json, write_json

FILE = "fingerprint.json"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
"""Files of a checkpoint directory whose content `model_identity` hashes (besides config.json)."""
SANDBOX_PLACEMENT = tuple(
    f"sandbox.{name}" for name in ("workers", "prefork", "url", "namespaces", "landlock", "start_timeout_s")
)
"""Sandbox settings that say where and how isolated code runs, not what a block returns (its limits do count)."""
SHOWN = 8
"""Differing settings named in a ResumeError message before "and N more"."""


class ResumeError(ConfigError):
    """A stage's directory holds results made under other settings (or unverifiable ones): a usage error."""


def settings_of(config: Any, prefix: str = "", leave_out: Iterable[str] = ()) -> dict[str, Any]:
    """A (nested) dataclass config as {dotted key: value}, without the keys in `leave_out`.

    `leave_out` names fields relative to `config` ("batch_size", "rollout.max_active"); a name also
    drops everything under it ("sandbox" drops "sandbox.timeout_s"). Keys in the result carry `prefix`.
    """
    skip = tuple(leave_out)
    flat: dict[str, Any] = {}

    def walk(value: Any, key: str) -> None:
        if key and any(key == s or key.startswith(s + ".") for s in skip):
            return
        if isinstance(value, dict) and value:
            for k, v in value.items():
                walk(v, f"{key}.{k}" if key else str(k))
        else:
            flat[prefix + key] = json.loads(json.dumps(value, default=str))

    walk(dataclasses.asdict(config), "")
    return flat


def digest(obj: Any) -> str:
    """A short content hash of a JSON-able object (sorted keys)."""
    text = json.dumps(obj, sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def _hash_file(path: Path, h: Any) -> None:
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)


def file_digest(path: str | Path) -> str:
    """sha256 of a file's content (16 hex digits), e.g. a training-data JSONL."""
    h = hashlib.sha256()
    _hash_file(Path(path), h)
    return "sha256:" + h.hexdigest()[:16]


def model_identity(model: str | Path) -> str:
    """What a model is: a checkpoint directory by the content of its config.json and weight files
    (reading them takes a few seconds per ten GB); a hub id or served model name by its name."""
    path = Path(model)
    if not str(model) or not path.is_dir():
        return f"name:{model}"
    h = hashlib.sha256()
    for p in sorted(path.rglob("*")):
        if p.is_file() and (p.name == "config.json" or p.suffix in WEIGHT_SUFFIXES):
            h.update(str(p.relative_to(path)).encode() + b"\0")
            _hash_file(p, h)
    return "sha256:" + h.hexdigest()[:16]


def problems_digest(problems: Sequence[Any]) -> str:
    """Content hash of a query set, in order: benchmark, id, question and answer of each problem."""
    return "sha256:" + digest([[str(p.benchmark), str(p.id), p.question, p.answer] for p in problems])


@dataclass
class Stage:
    """One stage's directory, its fingerprint settings and the results it writes there."""

    directory: Path
    kind: str
    """What the stage is, for messages: "E-step", "M-step", "evaluation", ..."""
    settings: dict[str, Any]
    """Everything that determines the output, as {dotted key: JSON value} (inputs by identity)."""
    outputs: tuple[str, ...]
    """Glob patterns (relative to `directory`) of the files and folders the stage writes."""

    @property
    def digest(self) -> str:
        return digest(self.settings)

    def existing(self) -> list[Path]:
        """The stage's results already on disk."""
        return sorted({p for pattern in self.outputs for p in self.directory.glob(pattern)})


def recorded(directory: str | Path) -> dict[str, Any] | None:
    """The fingerprint recorded in `directory`, or None."""
    path = Path(directory) / FILE
    return read_json(path) if path.exists() else None


def differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """`key: old -> new` for every setting that differs (missing on one side shows as "unset")."""

    def show(settings: dict[str, Any], key: str) -> str:
        text = json.dumps(settings[key], ensure_ascii=False) if key in settings else "unset"
        return text if len(text) <= 60 else text[:57] + "..."

    keys = sorted(k for k in set(old) | set(new) if old.get(k, ...) != new.get(k, ...))
    return [f"{k}: {show(old, k)} -> {show(new, k)}" for k in keys]


def mismatch(stage: Stage) -> str | None:
    """Why the results in the stage's directory cannot be reused for it, or None when they can."""
    found = stage.existing()
    if not found:
        return None
    record = recorded(stage.directory)
    if record is None:
        names = ", ".join(p.name for p in found[:4])
        return (
            f"{stage.directory} holds {stage.kind} results ({names}) without a fingerprint (written by an older "
            "version or by hand), so they cannot be checked against these settings"
        )
    diff = differences(record.get("settings", {}), stage.settings)
    if not diff:
        return None
    more = f"; and {len(diff) - SHOWN} more" if len(diff) > SHOWN else ""
    return f"{stage.directory} holds {stage.kind} results made with other settings: {'; '.join(diff[:SHOWN])}{more}"


def guard(stage: Stage, overwrite: bool = False) -> bool:
    """Make `stage.directory` safe to resume into; return True when earlier results were discarded.

    Matching results are kept (the stage resumes from them). Mismatching or unverifiable ones raise
    ResumeError, or with `overwrite` are deleted. Then the stage's fingerprint is recorded.
    """
    why = mismatch(stage)
    if why is not None and not overwrite:
        raise ResumeError(
            f"{why}. Rerun with the same settings to resume, or start fresh: another --out, or --overwrite "
            "(discards these results)"
        )
    if why is not None:
        discard(stage.existing())
    stage.directory.mkdir(parents=True, exist_ok=True)
    current = recorded(stage.directory)
    if current is None or current.get("settings") != stage.settings:
        write_json(stage.directory / FILE, {"stage": stage.kind, "digest": stage.digest, "settings": stage.settings})
    return why is not None


def discard(paths: Iterable[Path]) -> None:
    """Delete result files and folders (the fingerprint itself is replaced afterwards, never deleted)."""
    for path in paths:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)


__all__ = [
    "FILE",
    "ResumeError",
    "Stage",
    "differences",
    "digest",
    "discard",
    "file_digest",
    "guard",
    "mismatch",
    "model_identity",
    "problems_digest",
    "recorded",
    "settings_of",
]
