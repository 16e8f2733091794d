"""One progress display for the whole run (shown by rank 0 only): images done over all ranks, images/s, ETA.

Between synchronisations rank 0 estimates the run's progress as its own images times the number of ranks (the
ranks work in lock-step rounds of equal batches); at every round where the ranks sum their counts the estimate is
replaced by the true total. tqdm draws the bar when it is installed, else a plain line is printed every few seconds.
"""

from __future__ import annotations

import sys
import time


def format_seconds(seconds: float) -> str:
    """``75`` -> ``'1:15'``; ``3725`` -> ``'1:02:05'``.

    Example:
        >>> format_seconds(75), format_seconds(3725)
        ('1:15', '1:02:05')
    """
    seconds = int(max(seconds, 0))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


class Progress:
    """Progress over ``total`` images to generate in this run (already finished ones are not counted).

    Example:
        >>> p = Progress(total=4, enabled=False)
        >>> p.update(2); p.done
        2
    """

    def __init__(self, total: int, enabled: bool = True, stream=None, interval_s: float = 5.0, use_tqdm=None):
        self.total, self.done, self.enabled = total, 0, enabled
        self.stream = stream or sys.stderr
        self.interval_s = interval_s
        self.start = time.perf_counter()
        self._last_line = 0.0
        self._bar = None
        if enabled and use_tqdm is not False:
            try:
                from tqdm.auto import tqdm
            except ImportError:
                tqdm = None
            if tqdm is not None:
                self._bar = tqdm(
                    total=total, unit="img", desc="catprune generate", file=self.stream, dynamic_ncols=True
                )

    def rate(self) -> float:
        elapsed = time.perf_counter() - self.start
        return self.done / elapsed if elapsed > 0 else 0.0

    def update(self, count: int) -> None:
        """Add ``count`` images (an estimate until the next `set`)."""
        self.set(self.done + count)

    def set(self, done: int) -> None:
        """Set the run's images done so far (the true total after a synchronisation)."""
        done = min(int(done), self.total)
        if self._bar is not None:
            self._bar.update(done - self.done)
        self.done = done
        if self.enabled and self._bar is None:
            now = time.perf_counter()
            if now - self._last_line >= self.interval_s or done == self.total:
                self._last_line = now
                rate = self.rate()
                eta = (self.total - done) / rate if rate > 0 else float("inf")
                eta_text = format_seconds(eta) if eta != float("inf") else "?"
                print(
                    f"catprune generate: {done}/{self.total} images, {rate:.2f} img/s, ETA {eta_text}",
                    file=self.stream,
                    flush=True,
                )

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
