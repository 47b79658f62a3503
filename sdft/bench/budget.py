"""Time budgets: a part of a check gets a number of seconds; an item starts only when the time left covers
what it is expected to take (the duration of the previous item of its kind), otherwise it is skipped and the
skip says why."""
from __future__ import annotations

import time


class Budget:
    """`seconds` of wall-clock time from construction. `allows(kind)` is True while the time left is at least
    the last recorded duration of items of that kind (0 before the first); `record(kind, seconds)` records one.
    """

    def __init__(self, seconds: float, clock=time.monotonic):
        if not seconds >= 0:
            raise ValueError(f"a time budget must be >= 0 seconds, got {seconds!r}")
        self.seconds = float(seconds)
        self._clock = clock
        self._start = clock()
        self._last: dict[str, float] = {}

    def elapsed(self) -> float:
        return self._clock() - self._start

    def left(self) -> float:
        return self.seconds - self.elapsed()

    def allows(self, kind: str = "") -> bool:
        return self.left() > 0 and self.left() >= self._last.get(kind, 0.0)

    def record(self, kind: str, seconds: float) -> None:
        self._last[kind] = float(seconds)

    def skip_note(self, kind: str = "") -> str:
        """Why an item of `kind` does not start now."""
        expected = self._last.get(kind)
        need = f", an item of this kind took {expected:.0f} s" if expected else ""
        return f"skipped: {max(self.left(), 0.0):.0f} s left of the {self.seconds:.0f} s budget{need}"
