"""A rich progress bar that can be switched off (tests, nested use) without changing the caller."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager


@contextmanager
def progress_bar(total: int, description: str, enabled: bool = True) -> Iterator[Callable[[int], None]]:
    """Yield `advance(k)`; shows a rich bar with counts, rate and ETA when enabled."""
    if not enabled:
        yield lambda k: None
        return
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, transient=False) as bar:
        task = bar.add_task(description, total=total)
        yield lambda k: bar.advance(task, k)


@contextmanager
def fleet_progress(total: int, workers: int, enabled: bool = True) -> Iterator[Callable[[dict], None]]:
    """Yield `advance(record)`: one bar for all workers with trajectories done, generated tokens/s and code calls/s."""
    if not enabled:
        yield lambda record: None
        return
    import time

    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[tokens_s]:,.0f} tok/s  {task.fields[calls_s]:.1f} code calls/s"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    start, sums = time.monotonic(), {"tokens": 0, "calls": 0}
    with Progress(*columns, transient=False) as bar:
        label = f"rollouts ({workers} worker{'s' if workers > 1 else ''})"
        task = bar.add_task(label, total=total, tokens_s=0.0, calls_s=0.0)

        def advance(record: dict) -> None:
            sums["tokens"] += int(record.get("n_generated_tokens", 0))
            sums["calls"] += int(record.get("n_code_calls", 0))
            elapsed = max(time.monotonic() - start, 1e-9)
            bar.update(task, advance=1, tokens_s=sums["tokens"] / elapsed, calls_s=sums["calls"] / elapsed)

        yield advance
