"""The engine's schedule, simulated on the host: expected slot occupancy for a length budget.

The rollouts of one engine (sample/engine.py): N = questions x k candidates, queued question
by question; S slots; a pool of `pages` pages of `page` tokens. Response lengths are drawn
lognormal (median `median_fraction` x G, sigma `sigma`; the issue's reference distribution is
median G/4, sigma 0.7), rounded up and capped at the budget G. The simulation follows the
engine's rules, in pages:
  - a question's prompt takes ceil(P/page) pages while any of its candidates waits or runs; a
    candidate shares its full prompt pages and copies the partial last one (1 page if P % page);
  - a slot is refilled as soon as it frees (a segment ends when any slot finishes), from the
    preempted candidates first, then the queue, while `need + running + admitted <= free` (a
    page stays free for every running slot's next step, as `Engine._fill` keeps);
  - every running slot writes one token per step and takes a page when its length crosses a
    page boundary; a step runs only if the free pages cover every slot that needs one, else
    the most recently started candidate is preempted (its own pages return; on resumption it
    holds ceil((P + generated) / page) pages of its own: the engine prefills it again).
Occupancy = tokens generated / (S x decode steps): prefill time is not counted.
"""

from __future__ import annotations

import dataclasses
import math
from collections import deque

import numpy as np

MEDIAN_FRACTION = 0.25  # median response length / budget G
SIGMA = 0.7  # lognormal sigma of the response length
RUNS = 8  # schedules averaged (different length draws)


@dataclasses.dataclass(frozen=True)
class Occupancy:
    occupancy: float  # mean over runs of tokens / (S x steps)
    steps: float  # mean decode steps to finish all N candidates
    preemptions: float  # mean preemptions per run
    peak_pages: int  # most pages held at once, over all runs
    mean_length: float  # mean response length drawn
    complete: bool = True  # False: a run thrashed (preempting again and again) past the
    #                        simulation's budget of events; the figures cover what it ran


def mean_capped_lognormal(g: int, median_fraction=MEDIAN_FRACTION, sigma=SIGMA) -> float:
    """E[min(X, G)] for X lognormal with median `median_fraction` x G: the expected response
    length (continuous; the simulation rounds each draw up)."""
    mu = math.log(median_fraction * g)

    def phi(z):
        return 0.5 * (1 + math.erf(z / math.sqrt(2)))

    z = (math.log(g) - mu) / sigma
    return math.exp(mu + sigma**2 / 2) * phi(z - sigma) + g * (1 - phi(z))


def draw_lengths(rng, n: int, g: int, median_fraction=MEDIAN_FRACTION, sigma=SIGMA):
    x = rng.lognormal(math.log(median_fraction * g), sigma, n)
    return np.clip(np.ceil(x), 1, g).astype(np.int64)


def _pages_taken(kv_len, m: int, page: int) -> int:
    """Pages that sequences at lengths `kv_len` take in their next m tokens: one each time a
    token is written at a page boundary (positions kv_len .. kv_len + m - 1)."""
    return int(np.sum(-(-(kv_len + m) // page) + (-kv_len // page)))


def _run(lengths, k, p, slots, pages, page):
    """One schedule; -> (tokens, steps, preemptions, peak pages, finished). Each event (a
    segment ending) finishes or preempts a candidate: past 20 N + 2000 events the schedule
    is thrashing and the run stops there (finished False)."""
    n = len(lengths)
    full, partial = p // page, int(p % page > 0)
    prompt_pages = full + partial
    queue = deque(range(n))  # candidate i is candidate i % k of question i // k
    resumes: deque[int] = deque()
    generated = np.zeros(n, np.int64)
    pending = np.full(math.ceil(n / k), k)
    pending[-1] = n - k * (len(pending) - 1)
    running_q = np.zeros_like(pending)
    resident = np.zeros(len(pending), bool)
    slot = np.full(slots, -1)  # candidate in each slot
    x = np.zeros(slots, np.int64)  # kv_len
    shared = np.zeros(slots, np.int64)
    started = np.zeros(slots, np.int64)
    free, clock, steps, tokens, preempt, peak = pages, 0, 0, 0, 0, 0

    def release(s):
        nonlocal free
        free += math.ceil(x[s] / page) - shared[s]
        running_q[slot[s] // k] -= 1
        slot[s] = -1

    for _ in range(20 * n + 2000):
        # Fill (Engine._fill): resumed first, then the queue, in order.
        empty = np.flatnonzero(slot < 0)
        running = slots - len(empty)
        admitted = 0
        for s in empty:
            if not (resumes or queue):
                break
            from_resume = bool(resumes)
            i = resumes[0] if from_resume else queue[0]
            q = i // k
            if from_resume:
                need = math.ceil((p + generated[i]) / page)
            elif resident[q]:
                need = partial
            else:
                need = prompt_pages + partial
            if need + running + admitted > free:
                break
            (resumes if from_resume else queue).popleft()
            free -= need
            if from_resume:
                shared[s] = 0
            else:
                resident[q], shared[s] = True, full
                pending[q] -= 1
            slot[s], x[s] = i, p + generated[i]
            running_q[q] += 1
            clock += 1
            started[s] = clock
            admitted += 1
        peak = max(peak, pages - free)
        live = slot >= 0
        if not live.any():
            # Waiting candidates that no page count admits: stuck (as the engine would be).
            return tokens, steps, preempt, int(peak), not (resumes or queue)
        xs, left = x[live], lengths[slot[live]] - generated[slot[live]]
        horizon = int(left.min())

        lo, hi = 0, horizon  # the most steps (<= horizon) whose new pages the pool has
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if _pages_taken(xs, mid, page) <= free else (lo, mid - 1)
        m = lo
        free -= _pages_taken(xs, m, page)
        x[live] += m
        generated[slot[live]] += m
        steps += m
        tokens += m * int(live.sum())
        peak = max(peak, pages - free)
        # Harvest: finished candidates return their pages, then a question's prompt pages
        # return once none of its candidates waits or runs.
        for s in np.flatnonzero(live):
            i = slot[s]
            if generated[i] >= lengths[i]:
                q = i // k
                release(s)
                if pending[q] == 0 and running_q[q] == 0 and resident[q]:
                    resident[q] = False
                    free += prompt_pages
        # Out of pages: preempt the most recently started until the next step can run.
        while True:
            live = slot >= 0
            if int(np.sum(live & (x % page == 0))) <= free:
                break
            s = int(np.argmax(np.where(live, started, -1)))
            resumes.appendleft(int(slot[s]))
            release(s)
            preempt += 1
    return tokens, steps, preempt, int(peak), False


def simulate(
    n_candidates: int, k: int, prompt_len: int, max_new: int, slots: int, pages: int,
    page_size: int, *, median_fraction: float = MEDIAN_FRACTION, sigma: float = SIGMA,
    runs: int = RUNS, seed: int = 0,
) -> Occupancy:  # fmt: skip
    """Averages `runs` schedules of one engine's N candidates (module docstring)."""
    rng = np.random.default_rng(seed)
    out, lens = [], []
    for _ in range(runs):
        lengths = draw_lengths(rng, n_candidates, max_new, median_fraction, sigma)
        lens.append(lengths.mean())
        out.append(_run(lengths, k, prompt_len, slots, pages, page_size))
    tokens, steps, preempt, peak, done = (np.array(c, float) for c in zip(*out, strict=True))
    return Occupancy(
        occupancy=float(np.mean(tokens / (slots * np.maximum(steps, 1)))),
        steps=float(steps.mean()),
        preemptions=float(preempt.mean()),
        peak_pages=int(peak.max()),
        mean_length=float(np.mean(lens)),
        complete=bool(done.all()),
    )
