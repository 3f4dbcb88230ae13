"""A quiet progress line for long work: silent for the first second, then a live percentage.

Loading a small model takes well under a second and should print nothing; a large one
should show that something is happening. Output goes to stderr so that piped stdout
(generated text, JSON) stays clean.
"""

from __future__ import annotations

import sys
import time


class Progress:
    def __init__(self, label: str, total: int, enabled: bool = True, delay: float = 1.0, stream=None):
        self.label, self.total, self.enabled, self.delay = label, max(total, 1), enabled, delay
        self.stream = stream or sys.stderr
        self.started = time.perf_counter()
        self.shown = False
        self.last_percent = -1

    def update(self, done: int) -> None:
        # A live line only makes sense on a terminal; logs get just the final line.
        if not self.enabled or not self.stream.isatty() or time.perf_counter() - self.started < self.delay:
            return
        percent = 100 * done // self.total
        if percent != self.last_percent:
            self.stream.write(f"\r{self.label}: {percent:3d}%")
            self.stream.flush()
            self.shown, self.last_percent = True, percent

    def close(self) -> None:
        if self.shown:
            self.stream.write(f"\r{self.label}: done in {time.perf_counter() - self.started:.1f} s\n")
            self.stream.flush()
