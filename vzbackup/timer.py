"""Lap timer for the sub-steps of a phase (what ``-t`` prints under "frozen")."""

from __future__ import annotations

import time


class Timer:
    """``lap(name)`` records the seconds since the previous lap (or the start)."""

    def __init__(self) -> None:
        self.laps: dict[str, float] = {}
        self._last = time.monotonic()

    def lap(self, name: str) -> float:
        now = time.monotonic()
        self.laps[name] = self.laps.get(name, 0.0) + now - self._last
        self._last = now
        return now
