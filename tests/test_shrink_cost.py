"""The engine's rule for shrinking the tail's slots (sample/shrink_cost.py): the time saved over
the remaining steps, and the idle slots' cost so far, against a compilation, all from measured
call times."""

import pytest

from metastone_jax.sample import shrink_cost


@pytest.fixture(autouse=True)
def fresh_process_state(monkeypatch):
    monkeypatch.setattr(shrink_cost, "_program_ids", {})
    monkeypatch.setattr(shrink_cost, "_compiled", set())
    monkeypatch.setattr(shrink_cost, "_compile_seconds", {})
    monkeypatch.setattr(shrink_cost, "_idle_seconds", {})
    monkeypatch.setattr(shrink_cost, "_step_seconds", {})


def _clock(program="segment"):
    return shrink_cost.SegmentClock(program)


def test_compile_time_is_the_first_calls_excess_over_its_steps():
    clock = _clock()
    clock.record(256, 5.0, 64)  # first call at 256 slots: compile + 64 steps
    assert clock.compile_seconds() == 5.0  # no step time yet: the whole call, an upper bound
    clock.record(256, 1.28, 64)  # steady: 20 ms per step
    assert clock.per_step(256) == pytest.approx(0.02)
    assert clock.compile_seconds() == pytest.approx(5.0 - 64 * 0.02)
    assert clock.per_step(128) == pytest.approx(0.01)  # scaled linearly from 256


def test_shrinking_pays_when_the_saved_steps_outweigh_the_compilation():
    clock = _clock()
    clock.record(256, 5.0, 64)
    clock.record(256, 1.28, 64)  # 20 ms per step, compilation 3.72 s
    # 256 -> 128 saves 10 ms a step: 372 steps make up for the compilation.
    assert not clock.pays(256, 128, 300)
    assert clock.pays(256, 128, 400)
    # Compiled once (any earlier run in this process), a size always pays.
    clock.record(128, 4.0, 10)  # its first call: 10 steps at ~10 ms, the rest compilation
    assert clock.compiled(128) and clock.pays(256, 128, 1)
    # Another engine run of the same program knows both, the latest compilation included.
    other = _clock()
    assert other.compiled(128) and other.compile_seconds() == pytest.approx(4.0 - 10 * 0.01)


def test_nothing_is_known_before_a_steady_call():
    clock = _clock()
    assert clock.per_step(64) is None and clock.compile_seconds() is None
    assert not clock.pays(256, 8, 10**6)


def test_short_tails_of_many_calls_add_up_to_a_compilation():
    """Ski rental: each call's tail alone (100 steps at 256 slots that 128 would hold: 1 s
    idle at 20 ms a step) never pays for a 3.72 s compilation; the fourth call's does, once
    the idle seconds of the earlier ones count."""
    clock = _clock()
    clock.record(256, 5.0, 64)
    clock.record(256, 1.28, 64)  # 20 ms per step, compilation 3.72 s
    for call in range(4):
        run = _clock()  # one engine call each: the idle time is the process's
        assert run.pays(256, 128, 100) == (call == 3)
        run.record(256, 2.0, 100, fitting=[128, 160])  # its tail: live rows fit 128 slots
    assert shrink_cost._idle_seconds[(clock.program, 128)] == pytest.approx(4.0)
    assert shrink_cost._idle_seconds[(clock.program, 160)] == pytest.approx(4 * 0.75)


def test_programs_are_told_apart():
    """Another program's measurements (other static settings) are not this one's."""
    _clock("segment").record(256, 5.0, 64)
    _clock("segment").record(256, 1.28, 64)
    other = _clock(("segment", "other settings"))
    assert not other.compiled(256) and other.per_step(256) is None
