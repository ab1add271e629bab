"""Progress of long steps: a tqdm bar (count, rate, ETA) in a terminal; when stderr is not a terminal (CI,
nohup, a log file) one line at least every ``INSTAPRUNE_PROGRESS_SECONDS`` (default 30) seconds, written by a
background heartbeat so even a step that reports nothing for a while shows it is alive.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from typing import IO, Any

__all__ = ["Progress"]


def _fmt(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


class Progress:
    """``with Progress() as p: p.stage("train", total=400, unit="steps"); p.update(1, loss=...)``.

    ``enabled=False`` (e.g. non-zero DDP ranks) shows nothing."""

    def __init__(self, enabled: bool = True, stream: IO[str] | None = None, interval: float | None = None) -> None:
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        if interval is None:
            try:
                interval = float(os.environ.get("INSTAPRUNE_PROGRESS_SECONDS", "30"))
            except ValueError:
                interval = 30.0
        self.interval = max(interval, 0.05)
        self._lock = threading.Lock()
        self._bar: Any = None
        self._desc = ""
        self._n = 0
        self._total: int | None = None
        self._unit = "it"
        self._post: dict[str, Any] = {}
        self._t0 = self._stage_t0 = time.monotonic()
        self._last_line = time.monotonic()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ context
    def __enter__(self) -> Progress:
        if self.enabled:
            self._thread = threading.Thread(target=self._beat, name="instaprune-progress", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=1.0)
            self._thread = None
        with self._lock:
            self._close_bar()

    # ------------------------------------------------------------------ reporting
    def stage(self, desc: str, total: int | None = None, unit: str = "it") -> None:
        """Start a new step (closing the previous one's bar)."""
        with self._lock:
            self._close_bar()
            self._desc, self._n, self._total, self._unit, self._post = desc, 0, total, unit, {}
            self._stage_t0 = time.monotonic()
            if self.enabled and self.tty:
                from tqdm import tqdm

                self._bar = tqdm(total=total, desc=desc, unit=f" {unit}", file=self.stream, leave=False,
                                 dynamic_ncols=True)

    def update(self, n: int = 1, **postfix: Any) -> None:
        with self._lock:
            self._n += n
            if postfix:
                self._post = postfix
            if self._bar is not None:
                if postfix:
                    self._bar.set_postfix(postfix, refresh=False)
                self._bar.update(n)

    def __call__(self, stage: str) -> None:  # a stage-label callback for the library
        self.stage(stage)

    # ------------------------------------------------------------------ internals
    def _close_bar(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def line(self) -> str:
        elapsed = time.monotonic() - self._stage_t0
        parts = [f"instaprune: {self._desc or 'working'}:"]
        if self._total:
            frac = min(self._n / self._total, 1.0)
            eta = elapsed / frac * (1 - frac) if frac > 0 else None
            parts.append(f"{self._n}/{self._total} {self._unit} ({100 * frac:.0f}%)")
            parts.append(f"{_fmt(elapsed)} elapsed" + (f", ETA {_fmt(eta)}" if eta is not None else ""))
        else:
            if self._n:
                parts.append(f"{self._n} {self._unit}")
            parts.append(f"{_fmt(elapsed)} elapsed")
        if self._post:
            parts.append(" ".join(f"{k}={v}" for k, v in self._post.items()))
        return " ".join(parts[:1]) + " " + ", ".join(parts[1:])

    def _beat(self) -> None:
        while not self._stop.wait(min(self.interval, 1.0) if self.tty else self.interval / 4):
            with self._lock:
                now = time.monotonic()
                if self.tty:
                    if self._bar is not None:
                        self._bar.refresh()  # the elapsed time moves even when nothing is reported
                elif now - self._last_line >= self.interval:
                    self.stream.write(self.line() + "\n")
                    self.stream.flush()
                    self._last_line = now
