"""The restart delay sequence: capped exponential backoff with jitter.

Delay ``n`` (0-based) is ``min(initial * multiplier**n, max)``, scaled by a
uniform factor in ``[1 - jitter, 1 + jitter]`` and capped at ``max`` again (the
"equal jitter" family of AWS's *Exponential Backoff And Jitter*, kept simple).
The random source is injected so that tests are reproducible. Pure: no clock.
"""

from __future__ import annotations

import math
import random

from supervisor.spec import BackoffSpec

__all__ = ["Backoff"]


class Backoff:
    """Counts restarts and hands out delays.

    Args:
        spec: initial, max, multiplier, jitter (seconds and factors).
        rng: the random source for jitter; a fresh ``random.Random()`` if omitted.
    """

    def __init__(self, spec: BackoffSpec, *, rng: random.Random | None = None) -> None:
        self.spec = spec
        self._rng = rng or random.Random()
        self.attempt = 0

    def __repr__(self) -> str:
        return f"<Backoff attempt={self.attempt} next~{self.peek():.3f}s>"

    def peek(self) -> float:
        """The delay the next :meth:`next_delay` would return, before jitter (seconds)."""
        spec = self.spec
        if spec.initial <= 0:
            return 0.0
        # The exponent stops growing once the cap is reached, so no float overflows,
        # however long a crash loop runs.
        return min(spec.initial * spec.multiplier ** min(self.attempt, self._cap), spec.max)

    @property
    def _cap(self) -> int:
        """The first attempt whose delay reaches ``max`` (0 when it never grows)."""
        spec = self.spec
        if spec.multiplier <= 1 or spec.max <= spec.initial:
            return 0
        return math.ceil(math.log(spec.max / spec.initial) / math.log(spec.multiplier))

    def next_delay(self) -> float:
        """Return the delay before the next start (seconds) and count the attempt."""
        base = self.peek()
        self.attempt += 1
        if base <= 0 or self.spec.jitter <= 0:
            return base
        factor = 1.0 + self._rng.uniform(-self.spec.jitter, self.spec.jitter)
        return max(0.0, min(base * factor, self.spec.max))

    def reset(self) -> None:
        """Start again at ``initial`` (after ``reset_after`` seconds of healthy running)."""
        self.attempt = 0
