"""Test-time scaling over the sampler: best-of-k, voting, SPRM-guided step-level beam search,
early pruning, the low/medium/high modes, and both selection forms (docs/method.md section 5).

Candidates come from the continuous-batching engine (sample/engine.py). Beam search and early
pruning decode each question's candidates as a group that pauses at every step boundary, where
a `GroupPolicy` here decides (the engine moves beams' rows and pages); the thinking selection
continues the chosen thinking's row in a second engine run.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from metastone_jax.answers import extract_final_answer, majority_vote
from metastone_jax.sample import engine as paged_engine
from metastone_jax.sample import sampler
from metastone_jax.sample.processors import SamplingParams
from metastone_jax.sprm.aggregation import AGGREGATIONS, aggregate, select
from metastone_jax.sprm.steps import StepTokens

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
        """low / medium / high = k 2 / 8 / 32 (docs/method.md section 5)."""
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
    progress: bool = False,
) -> SearchResult:
    """Produces candidates with `search.strategy` and selects one per prompt. Candidates come
    from the continuous-batching engine (sample/engine.py; `engine`: its `EngineConfig`):
    beam search and early pruning as groups that pause at step boundaries; the thinking
    selection as a thinking run and an answer run that goes on from the chosen rows."""
    b = len(prompts)
    stats: dict = {}
    k = search.k
    common = dict(params=params, step=step, seeds=seeds, engine=engine, mesh=mesh,
                  progress=progress)  # fmt: skip
    if search.strategy == "beam":
        k = search.beam_width * search.expansions
        policy = _Beam(search, b)
        cands = paged_engine.generate(model, prompts, k=k, policy=policy, **common)
        stats.update(beam_rounds=max(len(kept) for kept in policy.kept) + 1,
                     beam_kept=policy.kept)  # fmt: skip
    elif search.selection == "thinking":
        cands = _thinking_then_answer(model, prompts, search, common, stats)
    elif search.prune_below is not None or search.prune_keep is not None:
        cands = paged_engine.generate(model, prompts, k=k, policy=_Pruning(search), **common)
        stats.update(_pruning_stats(cands, params.max_new_tokens))
    else:
        cands = paged_engine.generate(model, prompts, k=k, **common)
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


class _Pruning(paged_engine.GroupPolicy):
    """Early pruning at each step boundary: a live candidate with at least `prune_min_steps`
    steps is dropped when its running score is below `prune_below`, or when it ranks past
    `prune_keep` among the question's live candidates (ties to the lower index)."""

    keep_done = False  # a finished or pruned candidate leaves its slot at once

    def __init__(self, search: SearchConfig):
        self.search = search

    def at_barrier(self, question, round_, view):
        s = self.search
        value = np.asarray(view.running.value(s.aggregation))
        live = ~view.done
        eligible = live & (np.asarray(view.running.count) >= s.prune_min_steps)
        drop = np.zeros(live.shape, bool)
        if s.prune_below is not None:
            drop |= eligible & (value < s.prune_below)
        if s.prune_keep is not None:
            alive = np.flatnonzero(live & ~drop)
            if alive.size > s.prune_keep:
                order = alive[np.argsort(-value[alive], kind="stable")]
                drop[order[s.prune_keep :]] |= eligible[order[s.prune_keep :]]
        return paged_engine.GroupAction(prune=drop)


def _pruning_stats(cands: sampler.Candidates, max_new: int) -> dict:
    """Pruned candidates, and the tokens they did not generate, estimated by the mean length
    of the candidates of their prompt that ran to the end."""
    pruned = cands.finish == sampler.PRUNED
    saved = 0.0
    for i in range(pruned.shape[0]):
        full = cands.length[i][~pruned[i]]
        ref = full.mean() if full.size else max_new
        saved += float(np.clip(ref - cands.length[i][pruned[i]], 0, None).sum())
    return dict(pruned=int(pruned.sum()), tokens_saved_estimate=int(saved))


def _thinking_then_answer(model, prompts, search, common, stats) -> sampler.Candidates:
    """The paper's form: k thinking traces stop at `</think>`; the best one per question (by
    its step scores) continues into the answer, from the row it left (a second engine run:
    its prompt and thinking are prefilled again). Other candidates keep only their thinking."""
    step, params = common["step"], common["params"]
    if step.think_close is None:
        raise ValueError("selection='thinking' needs a `</think>` token in the vocabulary")

    def best(question, cands):  # cands: the question's k thinking traces
        return int(select(aggregate(cands.step_scores, cands.step_mask, search.aggregation))[0])

    think = dict(common, params=dataclasses.replace(
        params, stop_ids=(*params.stop_ids, step.think_close)))  # fmt: skip
    first = paged_engine.Engine(model, prompts, k=search.k, keep_row=best,
                                **_engine_args(think))  # fmt: skip
    cands, _ = first.run()
    scores = np.asarray(aggregate(cands.step_scores, cands.step_mask, search.aggregation))
    chosen = np.asarray(select(scores))
    resume = []
    for q, (j, row) in sorted(first.kept_rows.items()):
        if row.prev[0] == step.think_close and row.finish[0] == sampler.STOPPED:
            resume.append((q, j, row, row.tokens[0, : row.length[0]]))
    if resume:
        answers, _ = paged_engine.Engine(model, prompts, k=search.k, resume=resume,
                                         **_engine_args(common)).run()  # fmt: skip
        for q, j, _, _ in resume:
            for name in ("tokens", "length", "finish", "logprob", "step_scores", "step_index",
                         "step_mask"):  # fmt: skip
                getattr(cands, name)[q, j] = getattr(answers, name)[q, j]
    stats.update(selected=chosen, thinking_scores=scores)
    return cands


def _engine_args(common: dict) -> dict:
    """`engine.Engine`'s arguments from `run`'s (generate's defaults for the rest)."""
    return dict(
        params=common["params"], step=common["step"], seeds=common["seeds"],
        engine=common["engine"] or paged_engine.EngineConfig(), limits=None, pad_id=None,
        score_steps=True, keep_features=False, order=None, on_question=None,
        progress=common["progress"], mesh=common["mesh"],
    )  # fmt: skip


class _Beam(paged_engine.GroupPolicy):
    """SPRM-guided step-level beam search: W beams per prompt, each expanded into E children
    that advance to their next step token; at each step boundary the W best of the W * E by
    running score are kept, each E times (children share its pages). Child 0 keeps its
    parent's key, the others fork it, so W = E = 1 reproduces best-of-1 exactly; a finished
    beam is kept once (its duplicates are pruned). kept[q]: the beams kept at each round."""

    keep_done = True  # finished beams stay ranked until the whole group is done

    def __init__(self, search: SearchConfig, n_prompts: int):
        self.w, self.e, self.aggregation = search.beam_width, search.expansions, search.aggregation
        self.kept: list[list[list[int]]] = [[] for _ in range(n_prompts)]

    def at_barrier(self, question, round_, view):
        w, e = self.w, self.e
        n = w * e
        value = np.asarray(view.running.value(self.aggregation))
        value = np.where(view.finish == sampler.PRUNED, -np.inf, value)
        order = np.argsort(-value, kind="stable")[:w]  # ties to the lower index
        self.kept[question].append(order.tolist())
        source = np.repeat(order, e)[:n]
        child = np.tile(np.arange(e), w)[:n]
        keys = view.keys[source]
        fold = jax.vmap(jax.random.fold_in)
        forked = np.asarray(fold(jnp.asarray(keys), jnp.asarray(child + round_ * e)))
        keys = np.where((child == 0)[:, None], keys, forked).astype(np.uint32)
        return paged_engine.GroupAction(source=source, keys=keys,
                                        prune=(child > 0) & view.done[source])  # fmt: skip
