"""What a rollout run measured: wall time, requests, code calls and the backend's occupancy.

Occupancy is the time-weighted mean number of generation requests in flight at the backend over
`max_active`: 1 means the backend always had as much work as the engine may give it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any


@dataclass
class RolloutStats:
    """What `run_rollouts` measured; pass `stats=RolloutStats()` to have it filled in (added to across calls)."""

    schedule: str = ""
    """async or rounds (the last call's)."""
    wall_s: float = 0.0
    """Seconds spent in `run_rollouts`."""
    occupancy: float = 0.0
    """Time-weighted mean of generation requests in flight at the backend, over `max_active` (0..1)."""
    generation_requests: int = 0
    """Continuations asked of the backend."""
    code_calls: int = 0
    """Code blocks run in the sandbox."""
    trajectories: int = 0
    """Records produced."""

    def add(self, other: RolloutStats) -> None:
        """Fold another call's figures into these (occupancy weighted by wall time)."""
        wall = self.wall_s + other.wall_s
        if wall > 0:
            self.occupancy = (self.occupancy * self.wall_s + other.occupancy * other.wall_s) / wall
        self.schedule = other.schedule or self.schedule
        self.wall_s = wall
        self.generation_requests += other.generation_requests
        self.code_calls += other.code_calls
        self.trajectories += other.trajectories

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        """One line for reports and terminals."""
        return (
            f"{self.trajectories} trajectories, {self.generation_requests} generation requests, {self.code_calls} code"
            f" calls in {self.wall_s:.1f} s ({self.schedule} schedule); backend occupancy {100 * self.occupancy:.0f}%"
        )


class Meter:
    """Time integral of the number of generation requests in flight (changed from any thread)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.start = self.last = clock()
        self.level = 0
        self.area = 0.0
        self.requests = 0
        self._lock = threading.Lock()

    def change(self, delta: int) -> None:
        with self._lock:
            now = self.clock()
            self.area += self.level * (now - self.last)
            self.last, self.level = now, self.level + delta
            self.requests += max(delta, 0)

    def stats(self, schedule: str, capacity: int) -> RolloutStats:
        self.change(0)
        wall = self.last - self.start
        occupancy = self.area / (wall * capacity) if wall > 0 else 0.0
        return RolloutStats(schedule, wall, occupancy, self.requests)
