"""A progress bar on stderr for long merges: modules done of total, drawn only on a terminal and only once a
merge has run for ``delay`` seconds, so that quick merges and logs stay clean."""

from __future__ import annotations

import sys
import time
from typing import TextIO


class ProgressBar:
    """A ``progress(done, total, name)`` callback for ``merge``. ``enabled`` None: on when ``stream`` is a
    terminal."""

    def __init__(self, stream: TextIO | None = None, *, enabled: bool | None = None, delay: float = 2.0,
                 width: int = 28, label: str = "merging", clock=time.monotonic):
        self.stream = stream if stream is not None else sys.stderr
        isatty = getattr(self.stream, "isatty", None)
        self.enabled = bool(isatty and isatty()) if enabled is None else enabled
        self.delay, self.width, self.label, self.clock = delay, width, label, clock
        self.start = clock()
        self.last_draw = None
        self.drawn = False

    def __call__(self, done: int, total: int, name: str) -> None:
        if not self.enabled:
            return
        now = self.clock()
        if now - self.start < self.delay:
            return
        if done < total and self.last_draw is not None and now - self.last_draw < 0.1:
            return
        self.last_draw = now
        filled = self.width * done // max(total, 1)
        bar = "#" * filled + "." * (self.width - filled)
        line = f"\r{self.label} [{bar}] {done}/{total} modules"
        tail = f"  {name}"[:42] if done < total else ""
        self.stream.write(line + tail.ljust(42))  # padding wipes a longer previous name
        if done >= total:
            self.stream.write("\n")
        self.stream.flush()
        self.drawn = done < total

    def close(self) -> None:
        """End a bar left unfinished (an error mid-merge) with a newline, so the error starts its own line."""
        if self.drawn:
            self.stream.write("\n")
            self.stream.flush()
            self.drawn = False
