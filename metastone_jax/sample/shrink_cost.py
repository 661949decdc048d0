"""When shrinking the engine's slots pays: the time a smaller segment saves against the
compilation it costs, both measured in this process.

The engine's tail (queue empty, some candidates still running) decodes every slot each step;
moving the live rows into fewer slots (`Engine._maybe_shrink`) makes each step cheaper (the step
time grows about linearly with the slots on CPU: bench/RESULTS.md), but the segment must then be
compiled for the smaller slot count once per process. On a long tail (the heavy-tailed bench:
hundreds of steps of a few rows) that pays many times over; on a short one (the demo's 128-token
budget: a compilation takes ~200 steps of the full slots) it does not. A fixed threshold in steps
is right for one model and one machine only, so the engine measures both sides instead.

Many short calls of one program (GRPO rollouts every train step, a bench's rounds) add up to a
long tail that no single call sees: the time already lost to idle slots that a smaller size
would have saved counts too (ski rental: keep paying for the idle slots until what they cost
reaches the compilation, then compile; at most twice the cost of knowing the future).

Keys: (program, slots), where the program is the segment's static settings but the slot count,
interned to a small int once per run (hashing the settings, a model graph among them, took 4 ms
per lookup: 0.2 s of a 10 s fixed-length bench run).
"""

from __future__ import annotations

_program_ids: dict = {}  # program settings -> its int key
_compiled: set = set()  # (program, slots) compiled in this process
# program -> {slots: seconds per decode step, the last steady call's}
_step_seconds: dict = {}
# program -> seconds its last compilation took (the first call at a new slot count less its
# decode steps at the measured step time)
_compile_seconds: dict = {}
# (program, smaller slots) -> seconds the tail spent on slots this size would have left out,
# summed over the process's calls
_idle_seconds: dict = {}


class SegmentClock:
    """Times one engine run's segment calls (`program`: a hashable key of the segment's static
    settings but the slot count)."""

    def __init__(self, program):
        self.program = _program_ids.setdefault(program, len(_program_ids))
        self.pending: dict[int, tuple[float, int]] = {}  # slots -> (first call's s, its steps)

    def compiled(self, slots: int) -> bool:
        return (self.program, slots) in _compiled

    def mark_compiled(self, slots: int) -> None:
        """The segment at `slots` was compiled ahead (`EngineConfig.precompile`)."""
        _compiled.add((self.program, slots))

    def record(self, slots: int, seconds: float, steps: int, fitting=()) -> None:
        """One segment call at `slots` took `seconds` for `steps` decode steps. fitting: the
        smaller slot counts that would have held its live rows (the tail's; none while
        candidates wait)."""
        key = (self.program, slots)
        if key not in _compiled:
            _compiled.add(key)
            self.pending[slots] = (seconds, steps)
        elif steps:
            _step_seconds.setdefault(self.program, {})[slots] = seconds / steps
        for n, (first, first_steps) in list(self.pending.items()):
            per_step = self.per_step(n)
            if per_step is not None:
                _compile_seconds[self.program] = max(0.0, first - first_steps * per_step)
                del self.pending[n]
        for to in fitting:
            idle = (self.program, to)
            _idle_seconds[idle] = _idle_seconds.get(idle, 0.0) + self.saving(slots, to, steps)

    def per_step(self, slots: int) -> float | None:
        """Seconds per decode step at `slots`: measured there, else scaled linearly from the
        nearest measured slot count (None before any steady call)."""
        measured = _step_seconds.get(self.program)
        if not measured:
            return None
        near = min(measured, key=lambda n: abs(n - slots))
        return measured[near] * slots / near

    def saving(self, size: int, to: int, steps: int) -> float:
        """Seconds `steps` decode steps at `to` slots save over `size` (0: unmeasured)."""
        per_step = self.per_step(size)
        return 0.0 if per_step is None else per_step * (1 - to / size) * steps

    def compile_seconds(self) -> float | None:
        """The segment program's last measured compilation (None: not measured yet; a first
        call whose step time is unknown counts whole, an upper bound)."""
        if self.program in _compile_seconds:
            return _compile_seconds[self.program]
        if self.pending:
            return max(first for first, _ in self.pending.values())
        return None

    def pays(self, size: int, to: int, steps_left: int) -> bool:
        """Whether `to` slots instead of `size` save more time than compiling the segment for
        `to` costs (nothing once compiled): over the next `steps_left` steps (at most), and
        what idle slots that `to` would have left out already cost this process."""
        if self.compiled(to):
            return True
        compile_s = self.compile_seconds()
        if compile_s is None or self.per_step(size) is None:
            return False
        lost = _idle_seconds.get((self.program, to), 0.0)
        return lost + self.saving(size, to, steps_left) > compile_s
