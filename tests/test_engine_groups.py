"""Beam search and early pruning on the engine (groups that pause at step boundaries) against
the static sampler's round-by-round loops, kept here as references: the same candidates, token
for token, whatever the slots and the page size; the pages a beam's children share are counted
and all come back."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_sampler import CFG, PROMPTS, STEP

from metastone_jax.model import create_model
from metastone_jax.sample import engine, sampler
from metastone_jax.sample.engine import EngineConfig
from metastone_jax.sample.processors import SamplingParams
from metastone_jax.sample.search import SearchConfig, _Beam, _Pruning, run
from metastone_jax.sprm.aggregation import aggregate, select

# No top-p and no repetition penalty: a draw then flips between two implementations only when
# its uniform lands within fp32 rounding of a boundary (~1e-7 per token), not at a nucleus cut.
PARAMS = SamplingParams(temperature=1.0, max_new_tokens=40, stop_ids=(1,))
NO_STOP = SamplingParams(temperature=1.0, max_new_tokens=48)  # candidates live to be pruned
SEEDS = [3, 4, 5]


@pytest.fixture(scope="module")
def model():
    return create_model(CFG, seed=1)


def _gather_rows(state, rows):
    cache = state.cache.map_rows(lambda x: jnp.take(x, rows, axis=0))
    rest = jax.tree.map(lambda x: jnp.take(x, rows, axis=0) if x.ndim else x,
                        state.replace(cache=None))  # fmt: skip
    return rest.replace(cache=cache)


def _compact_cache(state):
    """Each row's valid slots first (the static beam loop's shared write index would run out of
    room otherwise); attention reads valid slots only and keys carry their rotary positions."""
    cache = state.cache
    order = jnp.argsort(~cache.valid, axis=1, stable=True)
    cache = cache.replace(
        k=tuple(jnp.take_along_axis(x, order[:, None, None, :], axis=3) for x in cache.k),
        v=tuple(jnp.take_along_axis(x, order[:, None, :, None], axis=2) for x in cache.v),
        valid=jnp.take_along_axis(cache.valid, order, axis=1),
        index=jnp.max(jnp.sum(cache.valid, axis=1)).astype(cache.index.dtype),
    )
    return state.replace(cache=cache)


def static_beam(model, prompt, seed, w, e, aggregation):
    """The static sampler's beam search (before the engine) on one prompt -> Candidates."""
    n = w * e
    state, opts, graphdef, model_state = sampler.start(
        model, [prompt], k=n, params=PARAMS, step=STEP, seeds=[seed], until_step=True,
        cache_extra=PARAMS.max_new_tokens,
    )  # fmt: skip
    rounds = 0
    while True:
        state = sampler.run_decode(graphdef, model_state, state, opts)
        rounds += 1
        if np.asarray(state.done).all():
            break
        value = np.asarray(state.running.value(aggregation))
        value = np.where(np.asarray(state.finish) == sampler.PRUNED, -np.inf, value)
        done = np.asarray(state.done)
        order = np.argsort(-value, kind="stable")[:w]
        rows, child = np.repeat(order, e)[:n], np.tile(np.arange(e), w)[:n]
        state = _compact_cache(_gather_rows(state, jnp.asarray(rows)))
        forked = jax.vmap(jax.random.fold_in)(state.keys, jnp.asarray(child + rounds * e))
        keys = jnp.where(jnp.asarray(child == 0)[:, None], state.keys, forked)
        dup = jnp.asarray((child > 0) & done[rows])
        state = state.replace(
            keys=keys.astype(jnp.uint32), paused=jnp.zeros_like(state.paused),
            done=state.done | dup, finish=jnp.where(dup, sampler.PRUNED, state.finish),
        )  # fmt: skip
        if not np.asarray(~state.done).any():
            break
    return sampler.to_candidates(state, 1, n)


def static_pruned(model, search):
    """The static sampler's early pruning: every row to its next step, prune, repeat (with the
    beam loop's cache compaction: without it, as search.py had it, the shared write index ran
    past the cache while rows waited paused, and candidates ended early as LENGTH)."""
    state, opts, graphdef, model_state = sampler.start(
        model, PROMPTS, k=search.k, params=NO_STOP, step=STEP, seeds=SEEDS, until_step=True,
        cache_extra=NO_STOP.max_new_tokens,
    )  # fmt: skip
    b, k = len(PROMPTS), search.k
    while True:
        state = sampler.run_decode(graphdef, model_state, state, opts)
        if np.asarray(state.done).all():
            break
        value = np.asarray(state.running.value(search.aggregation)).reshape(b, k)
        steps = np.asarray(state.running.count).reshape(b, k)
        live = ~np.asarray(state.done).reshape(b, k)
        eligible = live & (steps >= search.prune_min_steps)
        drop = eligible & (value < search.prune_below) if search.prune_below else live & False
        for i in range(b):
            alive = np.flatnonzero(live[i] & ~drop[i])
            if search.prune_keep is not None and alive.size > search.prune_keep:
                order = alive[np.argsort(-value[i, alive], kind="stable")]
                drop[i, order[search.prune_keep :]] |= eligible[i, order[search.prune_keep :]]
        flat = jnp.asarray(drop.reshape(-1))
        state = _compact_cache(state).replace(
            done=state.done | flat, finish=jnp.where(flat, sampler.PRUNED, state.finish),
            paused=jnp.zeros_like(state.paused),
        )  # fmt: skip
    return sampler.to_candidates(state, b, k)


def static_thinking(model, k):
    """The static sampler's thinking selection: k thinking traces stop at `</think>`, the best
    (geomean of its step scores) per prompt goes on into its answer in the same cache."""
    think = dataclasses.replace(PARAMS, stop_ids=(*PARAMS.stop_ids, STEP.think_close))
    state, opts, graphdef, model_state = sampler.start(
        model, PROMPTS, k=k, params=think, step=STEP, seeds=SEEDS
    )
    state = sampler.run_decode(graphdef, model_state, state, opts)
    b = len(PROMPTS)
    scores = aggregate(state.step_scores, sampler.final_step_mask(state), "geomean")
    rows = jnp.asarray(np.arange(b) * k + np.asarray(select(np.asarray(scores).reshape(b, k))))
    chosen = _gather_rows(state, rows)
    ended = jnp.asarray((np.asarray(chosen.prev) == STEP.think_close)
                        & (np.asarray(chosen.finish) == sampler.STOPPED))  # fmt: skip
    chosen = chosen.replace(done=chosen.done & ~ended,
                            finish=jnp.where(ended, sampler.RUNNING, chosen.finish))  # fmt: skip
    chosen = sampler.run_decode(graphdef, model_state, chosen,
                                dataclasses.replace(opts, params=PARAMS))  # fmt: skip
    state = jax.tree.map(lambda full, part: full.at[rows].set(part) if full.ndim else full,
                         state.replace(cache=None), chosen.replace(cache=None))  # fmt: skip
    return sampler.to_candidates(state, b, k), int(ended.sum())


def assert_same_candidates(got, want, rows=slice(None)):
    """got's prompts `rows` against all of want's."""
    for name in ("length", "finish", "tokens", "step_index"):
        np.testing.assert_array_equal(getattr(got, name)[rows], getattr(want, name), name)


@pytest.mark.parametrize("slots,page", [(0, 8), (12, 4)])
def test_beam_on_the_engine_equals_the_static_beam_loop(model, slots, page):
    """W=2 beams x E=3 children; 12 slots hold two of the three questions' groups at a time
    (the third waits for a whole group's slots); 4-token pages put partial pages under most
    forks (a child copies its parent's last page)."""
    search = SearchConfig(strategy="beam", beam_width=2, expansions=3)
    policy = _Beam(search, len(PROMPTS))
    conf = EngineConfig(slots=slots, page_size=page)
    got = engine.generate(model, PROMPTS, k=6, params=PARAMS, step=STEP, seeds=SEEDS,
                          engine=conf, policy=policy)  # fmt: skip
    forked = 0
    for i, prompt in enumerate(PROMPTS):
        want = static_beam(model, prompt, SEEDS[i], 2, 3, "geomean")
        assert_same_candidates(got, want, slice(i, i + 1))
        forked += sum(kept != [0, 1] for kept in policy.kept[i])
    assert forked > 0  # some rounds kept other beams than the first two: rows really moved


def test_pruning_on_the_engine_equals_the_static_loop(model):
    search = SearchConfig(k=6, prune_keep=2, prune_min_steps=1)
    got = engine.generate(model, PROMPTS, k=6, params=NO_STOP, step=STEP, seeds=SEEDS,
                          engine=EngineConfig(slots=6, page_size=4),
                          policy=_Pruning(search))  # fmt: skip
    want = static_pruned(model, search)
    assert (want.finish == sampler.PRUNED).sum() > 0
    assert_same_candidates(got, want)


def test_thinking_selection_on_the_engine_equals_the_static_loop(model):
    """Slots fewer than the candidates (the thinking run refills them), then the answer run
    continues the chosen rows from a prefill of their prompt and thinking."""
    got = run(model, PROMPTS, search=SearchConfig(k=4, selection="thinking"), params=PARAMS,
              step=STEP, seeds=SEEDS, engine=EngineConfig(slots=5, page_size=4))  # fmt: skip
    want, continued = static_thinking(model, 4)
    assert continued > 0  # some chosen thinking went on into an answer
    assert_same_candidates(got.candidates, want)


def test_beam_pages_are_counted_and_all_returned(model, monkeypatch):
    """After every segment, a page's holder count is the number of tables (up to their tokens)
    and resident prompts listing it; the free pages are those nobody holds; all are free at
    the end."""
    checks = {"n": 0, "shared": 0}
    original = engine.Engine._harvest

    def checked(self, results, bar):
        table, kv_len = jax.device_get((self.state.cache.page_table, self.state.cache.kv_len))
        holders = np.zeros(self.layout.pages, int)
        for s, req in enumerate(self.slot_req):
            if req is not None:
                np.add.at(holders, table[s, : -(-int(kv_len[s]) // self.layout.page_size)], 1)
        for q in self.questions.values():
            np.add.at(holders, np.asarray(q.pages, int), 1)
        np.testing.assert_array_equal(holders, self.refs)
        assert sorted(self.free) == np.flatnonzero(holders == 0).tolist()
        checks["n"] += 1
        checks["shared"] += int((holders > 1).sum())
        return original(self, results, bar)

    monkeypatch.setattr(engine.Engine, "_harvest", checked)
    search = SearchConfig(strategy="beam", beam_width=2, expansions=3)
    eng = engine.Engine(
        model, PROMPTS, k=6, params=PARAMS, step=STEP, seeds=SEEDS,
        engine=EngineConfig(slots=6, page_size=4), limits=None, pad_id=None, score_steps=True,
        keep_features=False, order=None, on_question=None, progress=False,
        policy=_Beam(search, len(PROMPTS)),
    )  # fmt: skip
    eng.run()
    assert checks["n"] > 5 and checks["shared"] > 0
    assert sorted(eng.free) == list(range(eng.layout.pages))


def test_groups_refuse_slots_or_pages_that_cannot_hold_them(model):
    policy = _Beam(SearchConfig(strategy="beam", beam_width=2, expansions=3), len(PROMPTS))
    run = lambda conf: engine.generate(model, PROMPTS, k=6, params=PARAMS, step=STEP,  # noqa: E731
                                       seeds=SEEDS, engine=conf, policy=policy)  # fmt: skip
    with pytest.raises(ValueError, match="slots=4 cannot hold a question's 6 candidates"):
        run(EngineConfig(slots=4))
    with pytest.raises(ValueError, match="pages=20: beam search and pruning need a pool"):
        run(EngineConfig(slots=6, page_size=4, pages=20))
