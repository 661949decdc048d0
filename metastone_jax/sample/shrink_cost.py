"""When shrinking the engine's slots pays: the time a smaller segment saves over the tail against
the compilation it costs, both measured in this process.

The engine's tail (queue empty, some candidates still running) decodes every slot each step;
moving the live rows into fewer slots (`Engine._maybe_shrink`) makes each step cheaper (the step
time grows about linearly with the slots on CPU: bench/RESULTS.md), but the segment must then be
compiled for the smaller slot count once per process. On a long tail (the heavy-tailed bench:
hundreds of steps of a few rows) that pays many times over; on a short one (the demo's 128-token
budget: a compilation takes ~200 steps of the full slots) it does not. A fixed threshold in steps
is right for one model and one machine only, so the engine measures both sides instead.
"""

from __future__ import annotations

# (segment program, layout with its slot count): compiled in this process.
_compiled: set = set()
# segment program -> seconds its last compilation took (the first call's time at a new slot
# count less its decode steps at the measured step time).
_compile_seconds: dict = {}


class SegmentClock:
    """Times one engine run's segment calls. `program`: the segment program's key (without the
    slot count); `layout(slots)`: the full key of one compiled shape."""

    def __init__(self, program, layout_key):
        self.program, self.layout_key = program, layout_key
        self.step_seconds: dict[int, float] = {}  # slots -> seconds per decode step
        self.pending: dict[int, tuple[float, int]] = {}  # slots -> (first call's s, its steps)

    def compiled(self, slots: int) -> bool:
        return (self.program, self.layout_key(slots)) in _compiled

    def record(self, slots: int, seconds: float, steps: int) -> None:
        """One segment call at `slots` took `seconds` for `steps` decode steps."""
        key = (self.program, self.layout_key(slots))
        if key not in _compiled:
            _compiled.add(key)
            self.pending[slots] = (seconds, steps)
        elif steps:
            self.step_seconds[slots] = seconds / steps
        for n, (first, first_steps) in list(self.pending.items()):
            per_step = self.per_step(n)
            if per_step is not None:
                _compile_seconds[self.program] = max(0.0, first - first_steps * per_step)
                del self.pending[n]

    def per_step(self, slots: int) -> float | None:
        """Seconds per decode step at `slots`: measured there, else scaled linearly from the
        nearest measured slot count (None before any steady call)."""
        if slots in self.step_seconds:
            return self.step_seconds[slots]
        if not self.step_seconds:
            return None
        near = min(self.step_seconds, key=lambda n: abs(n - slots))
        return self.step_seconds[near] * slots / near

    def compile_seconds(self) -> float | None:
        """The segment program's last measured compilation (None: not measured yet; a first
        call whose step time is unknown counts whole, an upper bound)."""
        if self.program in _compile_seconds:
            return _compile_seconds[self.program]
        if self.pending:
            return max(first for first, _ in self.pending.values())
        return None

    def pays(self, size: int, to: int, steps_left: int) -> bool:
        """Whether decoding the next `steps_left` steps (at most) at `to` slots instead of
        `size` saves more time than compiling the segment for `to` costs (nothing once
        compiled)."""
        if self.compiled(to):
            return True
        per_step, compile_s = self.per_step(size), self.compile_seconds()
        if per_step is None or compile_s is None:
            return False
        return per_step * (1 - to / size) * steps_left > compile_s
