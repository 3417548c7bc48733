"""A tiny progress/ETA logger for long work (pre-training, LoRA training, generation).

Prints lines such as ``train step 40/300 loss 1.234 12.3k tok/s eta 0:41`` every ``every_s``
seconds (or every ``every_n`` steps), plus the first and the last step. Lines go to a *sink*: any
``Callable[[str], None]`` such as the CLI's reporter, or stderr when none is given. The public
functions of tuneloop take that callable as their ``progress`` argument. No dependencies.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable

ProgressSink = Callable[[str], None]
"""Where progress lines go: ``print`` to stderr by default, a logger, the CLI's reporter."""


def format_duration(seconds: float) -> str:
    """``41 -> '0:41'``, ``3725 -> '1:02:05'``."""
    seconds = max(0, int(round(seconds)))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def format_rate(per_second: float) -> str:
    """``12345.6 -> '12.3k'``, ``950 -> '950'``."""
    if per_second >= 1e6:
        return f"{per_second / 1e6:.1f}M"
    if per_second >= 1e3:
        return f"{per_second / 1e3:.1f}k"
    if per_second >= 10:
        return f"{per_second:.0f}"
    return f"{per_second:.2f}"


class Progress:
    """Step counter that prints throughput and an ETA at an interval.

    Call :meth:`start` once the total is known, :meth:`update` after each step with the
    absolute step count, and :meth:`finish` at the end. ``Progress.silent()`` prints nothing.
    """

    def __init__(
        self,
        label: str = "",
        *,
        every_s: float = 10.0,
        every_n: int | None = None,
        sink: ProgressSink | None = None,
        enabled: bool = True,
        unit: str = "tok",
    ) -> None:
        self.label = label
        self.every_s = every_s
        self.every_n = every_n
        self.sink = sink
        self.enabled = enabled
        self.unit = unit
        self.total: int | None = None
        self.step_name = "step"
        self.done = 0
        self.items = 0
        self._started = time.monotonic()
        self._last_print = float("-inf")

    @classmethod
    def silent(cls) -> Progress:
        """A progress object that counts but never prints."""
        return cls(enabled=False)

    def start(self, total: int | None, *, step_name: str = "step", label: str | None = None) -> None:
        """Reset the clock for a run of ``total`` steps."""
        self.total = total
        self.step_name = step_name
        if label is not None:
            self.label = label
        self.done = 0
        self.items = 0
        self._started = time.monotonic()
        self._last_print = float("-inf")

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self._started

    def rate(self) -> float:
        """Items (tokens, examples) per second since :meth:`start`."""
        elapsed = self.elapsed
        return self.items / elapsed if elapsed > 0 else 0.0

    def update(self, done: int, *, items: int = 0, force: bool = False, **metrics: float) -> None:
        """Record that ``done`` steps are complete and ``items`` more were processed."""
        self.done = done
        self.items += items
        now = time.monotonic()
        due = (
            force
            or done <= 1
            or (self.total is not None and done >= self.total)
            or (self.every_n is not None and done % self.every_n == 0)
            or (self.every_n is None and now - self._last_print >= self.every_s)
        )
        if due and self.enabled:
            self._last_print = now
            self._emit(self.line(**metrics))

    def finish(self, **metrics: float) -> None:
        """Print a closing line with the total time."""
        if self.enabled:
            self._emit(self.line(**metrics) + f" done in {format_duration(self.elapsed)}")

    def note(self, text: str) -> None:
        """Print a one-off line (a checkpoint saved, an early stop) through the same sink."""
        if self.enabled:
            self._emit(f"{self.label} {text}" if self.label else text)

    def line(self, **metrics: float) -> str:
        """The text of one progress line."""
        parts = [self.label] if self.label else []
        total = f"/{self.total}" if self.total is not None else ""
        parts.append(f"{self.step_name} {self.done}{total}")
        for name, value in metrics.items():
            parts.append(f"{name} {value:.4g}" if isinstance(value, float) else f"{name} {value}")
        if self.items:
            parts.append(f"{format_rate(self.rate())} {self.unit}/s")
        if self.total and 0 < self.done < self.total:
            eta = self.elapsed / self.done * (self.total - self.done)
            parts.append(f"eta {format_duration(eta)}")
        return " ".join(parts)

    def _emit(self, text: str) -> None:
        if self.sink is not None:
            self.sink(text)
        else:
            print(text, file=sys.stderr, flush=True)
