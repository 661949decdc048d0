"""Test-time scaling over the sampler: best-of-k, voting, SPRM-guided step-level beam search,
early pruning, the low/medium/high modes, and both selection forms (SPRM.md section 5).

Everything is batched over prompts. Between decode segments (each candidate advanced to its next
step token), rows of the decode state are gathered on device: beams by source beam, the
selected thinking into the answer phase.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from metastone_jax.sample import engine as paged_engine
from metastone_jax.sample import sampler
from metastone_jax.sample.processors import SamplingParams
from metastone_jax.sprm import AGGREGATIONS, StepTokens, aggregate, select

MODES = {"low": 2, "medium": 8, "high": 32}
STRATEGIES = ("best_of_k", "vote", "weighted_vote", "beam")
SELECTIONS = ("response", "thinking")


@dataclasses.dataclass(frozen=True)
class SearchConfig:
    """How candidates are produced and one is chosen per prompt."""

    strategy: str = "best_of_k"
    k: int = 8  # candidates per prompt (beam: beams kept x expansions per beam)
    aggregation: str = "geomean"
    selection: str = "response"  # "response": among complete responses (released code);
    # "thinking": the best thinking, then the answer generated after it (the paper)
    beam_width: int = 2  # beams kept per prompt
    expansions: int = 4  # children sampled per kept beam at each step
    prune_below: float | None = None  # drop candidates whose running score falls below this
    prune_keep: int | None = None  # or keep only this many per prompt at each step boundary
    prune_min_steps: int = 2  # steps a candidate must have before it can be pruned

    def __post_init__(self):
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy: expected one of {STRATEGIES}, got {self.strategy!r}")
        if self.aggregation not in AGGREGATIONS:
            raise ValueError(
                f"aggregation: expected one of {tuple(AGGREGATIONS)}, got {self.aggregation!r}"
            )
        if self.selection not in SELECTIONS:
            raise ValueError(f"selection: expected one of {SELECTIONS}, got {self.selection!r}")
        if self.k < 1:
            raise ValueError(f"k: expected >= 1 candidates per prompt, got {self.k}")
        if self.beam_width < 1 or self.expansions < 1:
            raise ValueError(
                f"beam_width and expansions: expected >= 1, got {self.beam_width}, "
                f"{self.expansions}"
            )
        if self.selection == "thinking" and self.strategy != "best_of_k":
            raise ValueError(
                f"selection='thinking' picks one thinking by its SPRM score: it needs "
                f"strategy='best_of_k', got {self.strategy!r}"
            )

    @classmethod
    def for_mode(cls, mode: str, **overrides) -> SearchConfig:
        """low / medium / high = k 2 / 8 / 32 (SPRM.md section 5)."""
        if mode not in MODES:
            raise ValueError(f"mode: expected one of {tuple(MODES)}, got {mode!r}")
        return cls(k=MODES[mode], **overrides)


@dataclasses.dataclass
class SearchResult:
    """Per prompt: every candidate, its aggregated score and final answer, and the choice."""

    candidates: sampler.Candidates  # [B, k, ...]
    scores: np.ndarray  # [B, k] aggregated step scores (0 for a candidate with no step)
    answers: list[list[str | None]]  # [B][k] extracted final answers
    texts: list[list[str]]  # [B][k]
    selected: np.ndarray  # [B] index of the chosen candidate
    stats: dict


def _gather_rows(state: sampler.DecodeState, rows: jax.Array) -> sampler.DecodeState:
    """Rows of every per-candidate array, the cache's included."""
    cache = state.cache.map_rows(lambda x: jnp.take(x, rows, axis=0))
    rest = jax.tree.map(lambda x: jnp.take(x, rows, axis=0) if x.ndim else x,
                        state.replace(cache=None))  # fmt: skip
    return rest.replace(cache=cache)


@jax.jit
def _compact_cache(state: sampler.DecodeState) -> sampler.DecodeState:
    """Moves each row's valid cache slots to the front (order kept) and rewinds the write index.

    Rows paused at a step boundary leave invalid slots while others decode; without this the
    shared write index would run out of room after a few beam rounds. Attention only looks at
    valid slots in slot order and keys already carry their rotary positions, so moving the
    slots changes nothing."""
    cache = state.cache
    order = jnp.argsort(~cache.valid, axis=1, stable=True)  # [N, S]: valid slots first
    gather = order[:, None, :, None]  # slots are axis 2 of values [B, K, S, hd]
    cache = cache.replace(
        k=tuple(jnp.take_along_axis(x, order[:, None, None, :], axis=3) for x in cache.k),
        v=tuple(jnp.take_along_axis(x, gather, axis=2) for x in cache.v),
        valid=jnp.take_along_axis(cache.valid, order, axis=1),
        index=jnp.max(jnp.sum(cache.valid, axis=1)).astype(cache.index.dtype),
    )
    return state.replace(cache=cache)


def run(
    model,
    prompts: list[list[int]],
    *,
    search: SearchConfig,
    params: SamplingParams,
    step: StepTokens,
    tokenizer=None,
    seeds: list[int] | int = 0,
    mesh=None,
    engine=None,
) -> SearchResult:
    """Produces candidates with `search.strategy` and selects one per prompt. Complete
    candidates (best-of-k and the votes, without pruning) come from the continuous-batching
    engine (sample/engine.py; `engine`: its `EngineConfig`); beam search, early pruning and the
    thinking selection run on the static sampler."""
    from metastone_jax.evaluate.grading import extract_final_answer, majority_vote

    b = len(prompts)
    stats: dict = {}
    if search.strategy == "beam":
        state, k = _beam(model, prompts, search, params, step, seeds, mesh, stats)
    elif search.selection == "thinking":
        state, k = _thinking_then_answer(model, prompts, search, params, step, seeds, mesh, stats)
    elif search.prune_below is not None or search.prune_keep is not None:
        state, k = _sample_pruned(model, prompts, search, params, step, seeds, mesh, stats)
    else:
        state, k = None, search.k
        cands = paged_engine.generate(model, prompts, k=k, params=params, step=step,
                                      seeds=seeds, engine=engine, mesh=mesh)  # fmt: skip
    if state is not None:
        cands = sampler.to_candidates(state, b, k)
    scores = np.asarray(aggregate(cands.step_scores, cands.step_mask, search.aggregation))
    if "thinking_scores" in stats:  # the thinking was chosen on its own scores
        scores = stats.pop("thinking_scores")
    # Pruned candidates (early pruning, duplicates of finished beams) are never selected.
    scores = np.where(cands.finish == sampler.PRUNED, -1.0, scores)
    texts = cands.texts(tokenizer) if tokenizer is not None else [[""] * k for _ in range(b)]
    answers = [[extract_final_answer(t) for t in row] for row in texts]
    if "selected" in stats:
        selected = np.asarray(stats.pop("selected"))
    elif search.strategy == "vote":
        selected = np.array([majority_vote(a)[1] for a in answers])
    elif search.strategy == "weighted_vote":
        selected = np.array(
            [majority_vote(a, weights=w.tolist())[1] for a, w in zip(answers, scores, strict=True)]
        )
    else:  # best-of-k and beam: argmax, ties to the first
        selected = np.asarray(select(scores))
    stats["generated_tokens"] = int(cands.length.sum())
    return SearchResult(cands, scores, answers, texts, selected, stats)


def _sample_pruned(model, prompts, search, params, step, seeds, mesh, stats):
    """k candidates per prompt with early pruning at step boundaries (the static sampler)."""
    state, opts, graphdef, model_state = sampler.start(
        model, prompts, k=search.k, params=params, step=step, seeds=seeds, mesh=mesh,
        until_step=True,
    )  # fmt: skip
    pruned_at = np.full(len(prompts) * search.k, -1)
    while True:
        state = sampler.run_decode(graphdef, model_state, state, opts, mesh)
        done = np.asarray(state.done)
        if done.all():
            break
        state, newly = _prune(state, search, len(prompts))
        pruned_at[newly] = np.asarray(state.length)[newly]
        state = state.replace(paused=jnp.zeros_like(state.paused))
    lengths = np.asarray(state.length).reshape(len(prompts), search.k)
    finished = np.asarray(state.finish).reshape(len(prompts), search.k) != sampler.PRUNED
    pruned = pruned_at.reshape(len(prompts), search.k)
    # Tokens a pruned candidate did not generate, estimated by the mean length of the candidates
    # of its prompt that ran to the end.
    saved = 0
    for i in range(len(prompts)):
        full = lengths[i][finished[i]]
        ref = full.mean() if full.size else params.max_new_tokens
        saved += float(np.clip(ref - pruned[i][pruned[i] >= 0], 0, None).sum())
    stats.update(pruned=int((pruned >= 0).sum()), tokens_saved_estimate=int(saved))
    return state, search.k


def _prune(state, search, b):
    """Marks rows done (PRUNED) by threshold or rank on the running score; returns new ids."""
    k = search.k
    value = np.asarray(state.running.value(search.aggregation)).reshape(b, k)
    steps = np.asarray(state.running.count).reshape(b, k)
    live = ~np.asarray(state.done).reshape(b, k)
    eligible = live & (steps >= search.prune_min_steps)
    drop = np.zeros((b, k), bool)
    if search.prune_below is not None:
        drop |= eligible & (value < search.prune_below)
    if search.prune_keep is not None:
        for i in range(b):
            alive = np.flatnonzero(live[i] & ~drop[i])
            if alive.size > search.prune_keep:
                order = alive[np.argsort(-value[i, alive], kind="stable")]
                drop[i, order[search.prune_keep :]] |= eligible[i, order[search.prune_keep :]]
    flat = drop.reshape(-1)
    state = state.replace(
        done=state.done | jnp.asarray(flat),
        finish=jnp.where(jnp.asarray(flat), sampler.PRUNED, state.finish),
    )
    return state, np.flatnonzero(flat)


def _thinking_then_answer(model, prompts, search, params, step, seeds, mesh, stats):
    """The paper's form: k thinking traces stop at `</think>`; the best one per prompt (by its
    step scores) continues into the answer. Other candidates keep only their thinking."""
    if step.think_close is None:
        raise ValueError("selection='thinking' needs a `</think>` token in the vocabulary")
    think_params = dataclasses.replace(params, stop_ids=(*params.stop_ids, step.think_close))
    state, opts, graphdef, model_state = sampler.start(
        model, prompts, k=search.k, params=think_params, step=step, seeds=seeds, mesh=mesh
    )
    state = sampler.run_decode(graphdef, model_state, state, opts, mesh)
    b, k = len(prompts), search.k
    mask = sampler.final_step_mask(state)
    scores = np.asarray(aggregate(state.step_scores, mask, search.aggregation)).reshape(b, k)
    best = np.asarray(select(scores))
    # Continue only the chosen rows: gather them, run the answer phase, scatter them back.
    rows = jnp.asarray(np.arange(b) * k + best)
    chosen = _gather_rows(state, rows)
    ended_thinking = (np.asarray(chosen.prev) == step.think_close) & (
        np.asarray(chosen.finish) == sampler.STOPPED
    )
    chosen = chosen.replace(
        done=chosen.done & ~jnp.asarray(ended_thinking),
        finish=jnp.where(jnp.asarray(ended_thinking), sampler.RUNNING, chosen.finish),
    )
    answer_opts = dataclasses.replace(opts, params=params)
    chosen = sampler.run_decode(graphdef, model_state, chosen, answer_opts, mesh)
    state = jax.tree.map(
        lambda full, part: (
            full.at[rows].set(part) if full.ndim and full.shape[0] == b * k else full
        ),
        state.replace(cache=None),
        chosen.replace(cache=None),
    )
    stats.update(selected=best, thinking_scores=scores)
    return state, k


def _beam(model, prompts, search, params, step, seeds, mesh, stats):
    """SPRM-guided step-level beam search: W beams per prompt, each expanded into E children
    that advance to their next step token; the W best children by running score are kept and
    the cache is gathered by source. W = E = 1 reproduces best-of-1 exactly."""
    w, e = search.beam_width, search.expansions
    n_per = w * e
    b = len(prompts)
    state, opts, graphdef, model_state = sampler.start(
        model, prompts, k=n_per, params=params, step=step, seeds=seeds, mesh=mesh,
        until_step=True, cache_extra=params.max_new_tokens,
    )  # fmt: skip
    rounds, history = 0, []
    while True:
        state = sampler.run_decode(graphdef, model_state, state, opts, mesh)
        rounds += 1
        if np.asarray(state.done).all():
            break
        value = np.asarray(state.running.value(search.aggregation)).reshape(b, n_per)
        value = np.where(np.asarray(state.finish).reshape(b, n_per) == sampler.PRUNED, -np.inf,
                         value)  # fmt: skip
        done = np.asarray(state.done).reshape(b, n_per)
        rows = np.zeros((b, n_per), int)
        child = np.zeros((b, n_per), int)
        for i in range(b):
            # Rank, ties to the lower index; pruned duplicates rank last.
            order = np.argsort(-value[i], kind="stable")[:w]
            rows[i] = np.repeat(order, e)[:n_per] + i * n_per
            child[i] = np.tile(np.arange(e), w)[:n_per]
        history.append(rows[:, ::e] - np.arange(b)[:, None] * n_per)  # kept beams, per prompt
        rows_flat = jnp.asarray(rows.reshape(-1))
        state = _compact_cache(_gather_rows(state, rows_flat))
        # Child 0 keeps its parent's key (so W = E = 1 is best-of-1); the others fork it.
        keys = state.keys
        forked = jax.vmap(jax.random.fold_in)(keys, jnp.asarray(child.reshape(-1) + rounds * e))
        keys = jnp.where(jnp.asarray(child.reshape(-1) == 0)[:, None], keys, forked)
        # A finished beam is kept once: its duplicates are marked pruned.
        dup = jnp.asarray((child.reshape(-1) > 0) & done.reshape(-1)[rows.reshape(-1)])
        state = state.replace(
            keys=keys.astype(jnp.uint32),
            paused=jnp.zeros_like(state.paused),
            done=state.done | dup,
            finish=jnp.where(dup, sampler.PRUNED, state.finish),
        )
        if not np.asarray(~state.done).any():
            break
    stats.update(beam_rounds=rounds, beam_kept=[h.tolist() for h in history])
    return state, n_per
