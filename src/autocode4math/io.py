"""JSONL and JSON files that survive interruption.

Every long job in this project writes its results one JSON line at a time, flushed as it goes,
so a killed process loses at most the line it was writing. `read_done` reads such a file back for
resuming: a torn final line (the mark of a kill mid-write) is cut off, while a malformed line
anywhere else is an error that names the file and the line, because it means the file is not ours.
Whole files a resume reads are replaced, never rewritten in place: written to a temporary file,
fsynced, renamed over the old one, and the directory fsynced (`replace_file`), so a kill or a power
loss leaves either the old or the new file, never a mix and never nothing.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


class DataError(ValueError):
    """A data file is malformed; the message names the file and, where known, the line."""


def read_jsonl(path: str | Path, torn_tail_ok: bool = False) -> Iterator[dict[str, Any]]:
    """Yield one dict per non-blank line; raise DataError naming `path:line` on any bad line.

    With `torn_tail_ok`, an unparsable last line without its newline (a writer is still appending, or
    was killed mid-line) ends the file instead; the file is left as it is.
    """
    path = Path(path)
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line.rstrip("\r\n"))  # so an error past the content names its column
            except json.JSONDecodeError as e:
                if torn_tail_ok and not line.endswith("\n"):
                    return
                raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg}, column {e.colno})") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
            yield row


def fsync_dir(path: str | Path) -> None:
    """Make a rename or a new entry in directory `path` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _temp_beside(path: Path) -> Path:
    """A new, empty temporary file next to `path` (`NAME.<random>.tmp`), unique to this call, so that
    processes or threads writing the same file at once (seeds of one study sharing its base evaluation)
    never write into, or rename away, each other's temporary file."""
    fd, name = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    os.close(fd)
    os.chmod(name, 0o644)  # mkstemp's 0600 would make results unreadable to others once renamed into place
    return Path(name)


@contextmanager
def replacing(path: str | Path) -> Iterator[Path]:
    """Write a file atomically: yield a fresh temporary path beside `path` to write; on a normal exit it is
    moved over `path` (`replace_file`), on an error it is removed and `path` keeps its old content."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_beside(path)
    try:
        yield tmp
        replace_file(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)  # left only when writing failed: the rename moved it otherwise


def replace_file(tmp: str | Path, path: str | Path) -> None:
    """Move the finished temporary file `tmp` over `path` durably: fsync it, rename, fsync the directory."""
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(Path(path).parent)


def write_jsonl(path: str | Path, rows: Iterable[dict[str, Any]]) -> None:
    """Write rows atomically: to a temporary file first, then renamed over `path` (`replacing`)."""
    with replacing(path) as tmp, tmp.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


class JsonlAppender:
    """Append rows to a JSONL file, flushing each one so an interruption loses at most one line."""

    def __init__(self, path: str | Path, fsync: bool = False) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = self.path.open("a", encoding="utf-8")
        self._fsync = fsync

    def write(self, row: dict[str, Any]) -> None:
        self._file.write(json.dumps(row, ensure_ascii=False) + "\n")
        self._file.flush()
        if self._fsync:
            os.fsync(self._file.fileno())

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> JsonlAppender:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_done(path: str | Path) -> list[dict[str, Any]]:
    """Read the rows a previous (possibly killed) run appended to `path`, for resuming.

    A torn last line is removed from the file so that appending can continue cleanly. A missing
    file means nothing was done yet.
    """
    path = Path(path)
    if not path.exists():
        return []
    raw = path.read_bytes()
    if raw and not raw.endswith(b"\n"):
        cut = raw.rfind(b"\n") + 1
        with path.open("r+b") as f:
            f.truncate(cut)
    return list(read_jsonl(path))


def write_json(path: str | Path, obj: Any) -> None:
    """Write JSON atomically (`replacing`)."""
    with replacing(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def read_json(path: str | Path) -> Any:
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
