"""A token bucket shared by threads: at most a given number of KiB per second.

The one rate limiter of the product: backup uploads (``bwlimit`` of a storage and of a
backup) and the migration stream pace themselves with it."""

from __future__ import annotations

import threading
import time


class Limiter:
    """``take(n)`` sleeps as long as needed to keep the rate at *kbps* KiB/s (0/None: no limit)."""

    def __init__(self, kbps: int | None) -> None:
        self.rate = kbps * 1024 if kbps else 0
        self.lock = threading.Lock()
        self.t = time.monotonic()
        self.total = 0  # bytes taken so far

    def take(self, n: int) -> None:
        with self.lock:
            self.total += n
            if not self.rate:
                return
            now = time.monotonic()
            self.t = max(self.t, now) + n / self.rate
            delay = self.t - now
        if delay > 0:
            time.sleep(delay)
