"""Jitted batched sampling with the SPRM step score read inside the decode loop.

Prefill runs once per prompt (prompts left-padded to a length bucket), its cache is repeated k
times, and a `lax.while_loop` decodes all N = B*k candidates together. Each iteration has, from
the previous forward, the logits that predict the next token and the penultimate feature at the
same position (docs/method.md section 2: the feature that scores a step token is the one whose LM
output predicted it). So when the sampled token is a step token, its score is
sigmoid(SPRM head(that feature)): one small MLP, never a second forward pass.

The loop can also stop every candidate at its next step boundary (`until_step=True`), which is
how step-level beam search and early pruning advance: the search gathers rows between segments.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from metastone_jax.attention.kv_cache import KVCache, grow_layer
from metastone_jax.sample.draw import draw
from metastone_jax.sample.processors import SamplingParams, seen_from_tokens, update_seen
from metastone_jax.sharding import constrain
from metastone_jax.sprm.aggregation import RunningScore
from metastone_jax.sprm.steps import StepTokens, inference_range, is_id, isin_ids, starts_step

RUNNING, STOPPED, LENGTH, PRUNED = 0, 1, 2, 3
FINISH_REASONS = ("running", "stop", "length", "pruned")


@struct.dataclass
class DecodeState:
    """Everything the decode loop carries; N candidates, G max new tokens, S max steps."""

    cache: KVCache
    next_logits: jax.Array  # [N, V] f32: predicts the next token
    next_feature: jax.Array  # [N, D]: penultimate feature at the same position
    tokens: jax.Array  # [N, G] int32 generated tokens (pad after the end)
    length: jax.Array  # [N] int32 tokens generated so far
    limit: jax.Array  # [N] int32 the row's length cap (max_new_tokens, or less per request)
    prompt_len: jax.Array  # [N] int32 real prompt tokens
    prev: jax.Array  # [N] int32 the last token of the sequence so far
    done: jax.Array  # [N] bool
    paused: jax.Array  # [N] bool: stopped at a step boundary (until_step mode)
    finish: jax.Array  # [N] int32 one of RUNNING, STOPPED, LENGTH, PRUNED
    logprob: jax.Array  # [N] f32 sum of the tokens' log-probs (see `draw.draw`)
    seen: jax.Array  # [N, V] bool tokens present so far (repetition penalty)
    n_open: jax.Array  # [N] int32 count of <think> so far (prompt included)
    n_close: jax.Array  # [N] int32 count of </think> so far
    open_pos: jax.Array  # [N] int32 sequence position of the first <think> (-1: none)
    close_pos: jax.Array  # [N] int32 sequence position of the last </think> (-1: none)
    think_tokens: jax.Array  # [N] int32 generated tokens inside the think span
    step_scores: jax.Array  # [N, S] f32 sigmoid(SPRM) at each recorded step token
    step_index: jax.Array  # [N, S] int32 generated-token index of each recorded step
    step_features: jax.Array | None  # [N, S, D] the feature each step was scored on, or None
    n_steps: jax.Array  # [N] int32
    running: RunningScore  # aggregate over steps inside the think span so far
    keys: jax.Array  # [N, 2] uint32, one PRNG key per candidate
    clock: jax.Array  # [] int32 decode iterations run (bounds the loop by the cache's room)


@dataclasses.dataclass(frozen=True)
class DecodeOptions:
    """Static settings of one decode call (hashable: part of the jit cache key)."""

    params: SamplingParams
    step: StepTokens
    pad_id: int = 0
    until_step: bool = False  # pause each candidate after its next scored step
    score_steps: bool = True  # False: the same loop without the SPRM head (benchmarks)
    # Keep each recorded step's penultimate feature, so that other SPRM heads on the same
    # backbone can score the same candidates afterwards without sampling them again.
    keep_features: bool = False
    # The cache's full length: a smaller cache grows towards it while candidates still run
    # (`run_decode`); 0 = the state's cache is already all of it.
    cache_len: int = 0


# The first cache holds this many new tokens per row (the prompt is a shared prefix); each
# growth doubles it, up to the budget. Attention reads every slot of the cache each step, so a cache
# sized to the tokens generated so far saves work (and batches that stop early never pay for
# the budget), at one more compilation of the loop per size.
GROW_SLOTS = 64


def bucket_length(n: int, minimum: int = 16) -> int:
    """Prompt lengths are padded up to a power of two (bounded recompiles)."""
    return max(minimum, 1 << max(0, math.ceil(math.log2(max(n, 1)))))


def _constrain(s: DecodeState) -> DecodeState:
    """Candidates are laid over ('data','fsdp'); KV heads over 'tensor' (a no-op without mesh)."""

    def rows(x):
        return constrain(x, ("batch",) + (None,) * (x.ndim - 1)) if x.ndim else x

    cache = s.cache
    kv = ("batch", "kv_heads", None, None)
    cache = cache.replace(
        k=tuple(constrain(x, kv) for x in cache.k), v=tuple(constrain(x, kv) for x in cache.v)
    )
    if cache.prefix_k is not None:
        # One per prompt, over the rows' mesh axes as far as the prompt count divides them (else
        # replicated): rows are prompt-major, so a prompt's k rows sit on its prompt's devices.
        shared = ("batch", "kv_heads", None, None)
        cache = cache.replace(
            prefix_k=tuple(constrain(x, shared) for x in cache.prefix_k),
            prefix_v=tuple(constrain(x, shared) for x in cache.prefix_v),
        )
    rest = jax.tree.map(rows, s.replace(cache=None))
    return rest.replace(cache=cache.replace(valid=rows(cache.valid)))


def prefill(graphdef, model_state, tokens, valid, *, k: int, cache_len: int, opts: DecodeOptions):
    """Runs the padded prompts once and builds the decode state for k candidates per prompt.

    tokens, valid: [B, P] (left-padded). Returns a DecodeState with N = B*k rows, ordered
    prompt-major (rows b*k .. b*k+k-1 belong to prompt b), whose cache holds the prompts once,
    as a prefix shared by their k rows, and cache_len empty slots per row.
    """
    model = nnx.merge(graphdef, model_state)
    cfg = model.cfg
    b, p = tokens.shape
    cache = KVCache.init(cfg, b, p)
    # Only the last position's logits predict a token: the head runs on it alone, not on [B, P].
    out = model(tokens, valid=valid, cache=cache, with_logits=False)
    g, s_max = opts.params.max_new_tokens, _max_steps(opts.params)
    per_prompt = dict(
        next_logits=model.lm_logits(out.hidden[:, -1:])[:, 0],
        next_feature=out.features[:, -1],
        **prompt_fields(tokens, valid, opts.step, cfg.vocab_size),
    )
    per_prompt = {name: jnp.repeat(x, k, axis=0) for name, x in per_prompt.items()}
    n = b * k
    state = DecodeState(
        cache=KVCache.init(cfg, b * k, cache_len).with_prefix(out.cache),
        tokens=jnp.full((n, g), opts.pad_id, jnp.int32),
        length=jnp.zeros((n,), jnp.int32),
        limit=jnp.full((n,), g, jnp.int32),
        done=jnp.zeros((n,), bool),
        paused=jnp.zeros((n,), bool),
        finish=jnp.zeros((n,), jnp.int32),
        logprob=jnp.zeros((n,), jnp.float32),
        think_tokens=jnp.zeros((n,), jnp.int32),
        step_scores=jnp.zeros((n, s_max), jnp.float32),
        step_index=jnp.full((n, s_max), -1, jnp.int32),
        step_features=(
            jnp.zeros((n, s_max, cfg.d_model), out.features.dtype) if opts.keep_features else None
        ),
        n_steps=jnp.zeros((n,), jnp.int32),
        running=RunningScore.init((n,)),
        keys=jnp.zeros((n, 2), jnp.uint32),
        clock=jnp.zeros((), jnp.int32),
        **per_prompt,
    )
    return _constrain(state)


def prompt_fields(tokens, valid, step: StepTokens, vocab_size: int) -> dict:
    """The decode state's prompt-derived fields of padded prompts tokens, valid [B, P] (left or
    right padding): prompt_len, prev (the last real token), seen [B, V], the think-tag counts
    and positions (`DecodeState`); positions count real tokens only."""
    positions = jnp.cumsum(valid, axis=1) - 1
    prompt_len = jnp.sum(valid, axis=1).astype(jnp.int32)
    last = jnp.argmax(jnp.where(valid, positions, -1), axis=1)  # the last real token's column
    is_open = valid & is_id(tokens, step.think_open)
    is_close = valid & is_id(tokens, step.think_close)
    big = jnp.iinfo(jnp.int32).max
    first_open = jnp.min(jnp.where(is_open, positions, big), axis=1)
    return dict(
        prompt_len=prompt_len,
        prev=jnp.take_along_axis(tokens, last[:, None], axis=1)[:, 0].astype(jnp.int32),
        seen=seen_from_tokens(tokens, vocab_size, valid),
        n_open=jnp.sum(is_open, axis=1).astype(jnp.int32),
        n_close=jnp.sum(is_close, axis=1).astype(jnp.int32),
        open_pos=jnp.where(first_open == big, -1, first_open).astype(jnp.int32),
        close_pos=jnp.max(jnp.where(is_close, positions, -1), axis=1).astype(jnp.int32),
    )


def _max_steps(params: SamplingParams) -> int:
    # A scored step is the first of a run, so at most every other token is one.
    return max(1, (params.max_new_tokens + 1) // 2)


def decode(graphdef, model_state, state: DecodeState, opts: DecodeOptions) -> DecodeState:
    """Decodes until every candidate is done (or paused, with `until_step`), or the cache is full.

    Jit with `opts` static and `state` donated; `model_state` (the params) is an argument, so
    one compilation serves any weights of the same shapes.
    """
    limit = state.clock + (state.cache.max_len - state.cache.index)  # the cache's free slots
    # The per-layer weights are sliced out of the stacked ones once, here: on XLA:CPU a slice in
    # the loop body copies every weight matrix each step (Transformer.layer_params). Not on
    # accelerators, where the copy would double the weights' memory and XLA's fusions can read
    # the slice in place (not measured here: no accelerator).
    layers = None
    if jax.default_backend() == "cpu":
        layers = nnx.merge(graphdef, model_state).layer_params()

    def cond(s: DecodeState):
        active = ~s.done & ~s.paused
        return jnp.any(active) & (s.clock < limit)

    def forward(model, token, active, s):
        out = model(token[:, None], valid=active[:, None], cache=s.cache, layers=layers)
        return out.logits[:, 0], out.features[:, 0], out.cache

    def body(s: DecodeState) -> DecodeState:
        return _constrain(advance(s, opts, nnx.merge(graphdef, model_state), forward))

    state = jax.lax.while_loop(cond, body, _constrain(state))
    if state.cache.max_len < opts.cache_len:
        return state  # out of room in a cache that will grow: `run_decode` goes on
    # Out of cache: whatever is still running ends by length.
    out_of_room = ~state.done & ~state.paused
    return state.replace(
        done=state.done | out_of_room,
        finish=jnp.where(out_of_room, LENGTH, state.finish),
    )


def advance(s: DecodeState, opts: DecodeOptions, model, forward) -> DecodeState:
    """One token for every active row: draw it, score it if it is a step token, update the
    bookkeeping, and run the model on it. `forward(model, token [N], active [N], s) ->
    (logits [N, V], features [N, D], cache)` runs the model over the state's cache (the dense
    cache here, the paged one in sample/engine.py): everything else is shared."""
    params, step = opts.params, opts.step
    active = ~s.done & ~s.paused
    # A candidate's j-th token uses fold_in(its key, j): independent of batch scheduling
    # (beam search pauses rows), so a kept beam continues exactly as it would alone.
    keys = jax.vmap(jax.random.fold_in)(s.keys, s.length)
    inside = (s.n_open > 0) & (s.n_close == 0)
    forced = None
    if params.think_budget is not None and step.think_close is not None:
        # Controllable thinking length: past the budget, `</think>` is forced.
        force = inside & (s.think_tokens >= params.think_budget)
        forced = jnp.where(force, step.think_close, -1)
    token, logprob = draw(s.next_logits, s.seen, keys, params, forced)
    token = jnp.where(active, token, opts.pad_id).astype(jnp.int32)
    pos = s.prompt_len + s.length  # sequence position of this token

    # Step token under rules 1-2 (first of a run, not right after <think>); the range comes at
    # the end (final_step_mask).
    is_step = starts_step(token, s.prev, step) & active
    if opts.score_steps:
        score = jax.nn.sigmoid(model.sprm_logits(s.next_feature))
    else:
        score = jnp.zeros(token.shape, jnp.float32)
    slot = jnp.minimum(s.n_steps, s.step_scores.shape[1] - 1)
    rows = jnp.arange(token.shape[0])
    step_scores = s.step_scores.at[rows, slot].set(
        jnp.where(is_step, score, s.step_scores[rows, slot])
    )
    step_index = s.step_index.at[rows, slot].set(
        jnp.where(is_step, s.length, s.step_index[rows, slot])
    )
    step_features = s.step_features
    if opts.keep_features:
        old = s.step_features[rows, slot]
        step_features = s.step_features.at[rows, slot].set(
            jnp.where(is_step[:, None], s.next_feature, old)
        )
    # The running aggregate (for search) counts steps inside the think span so far, or all
    # with no <think> but the sequence's second token (never scored, final_step_mask); the
    # final mask is decided on the whole sequence.
    in_span = ((s.n_open == 0) & (pos > 1)) | inside
    running = s.running.update(score, is_step & in_span)

    is_open = active & is_id(token, step.think_open)
    is_close = active & is_id(token, step.think_close)
    at = jnp.minimum(s.length, s.tokens.shape[1] - 1)
    tokens = s.tokens.at[rows, at].set(jnp.where(active, token, s.tokens[rows, at]))
    length = s.length + active
    stop = active & isin_ids(token, params.stop_ids)
    full = active & ~stop & (length >= s.limit)
    finish = jnp.where(stop, STOPPED, jnp.where(full, LENGTH, s.finish))

    logits, features, cache = forward(model, token, active, s)
    return s.replace(
        cache=cache,
        next_logits=jnp.where(active[:, None], logits, s.next_logits),
        next_feature=jnp.where(active[:, None], features, s.next_feature),
        tokens=tokens,
        length=length,
        prev=jnp.where(active, token, s.prev),
        done=s.done | stop | full,
        paused=s.paused | (is_step & opts.until_step),
        finish=finish,
        logprob=s.logprob + jnp.where(active, logprob, 0.0),
        seen=jnp.where(active[:, None], update_seen(s.seen, token), s.seen),
        n_open=s.n_open + is_open,
        n_close=s.n_close + is_close,
        open_pos=jnp.where(is_open & (s.open_pos < 0), pos, s.open_pos),
        close_pos=jnp.where(is_close, pos, s.close_pos),
        think_tokens=s.think_tokens + (active & inside & ~is_close),
        step_scores=step_scores,
        step_index=step_index,
        step_features=step_features,
        n_steps=s.n_steps + is_step,
        running=running,
        clock=s.clock + 1,
    )


def final_step_mask(state: DecodeState) -> jax.Array:
    """[N, S] bool: recorded steps that the released inference scorer counts, as
    `sprm.steps.step_mask(mode="inference")` on the prompt + response: after the `<think>` if the
    sequence holds exactly one, else after its second token (the released fallback never
    scores that one); up to the `</think>` (inclusive) if it holds exactly one, else to the end
    (docs/method.md section 2, rule 3). Positions count the real tokens only (0: the first prompt
    token), so left padding does not move them."""
    s_max = state.step_scores.shape[1]
    recorded = jnp.arange(s_max)[None, :] < jnp.minimum(state.n_steps, s_max)[:, None]
    pos = state.prompt_len[:, None] + state.step_index
    in_range = inference_range(
        pos, state.n_open, state.open_pos, state.n_close, state.close_pos,
        lo_fallback=1, hi_fallback=jnp.iinfo(jnp.int32).max,
    )  # fmt: skip
    return recorded & in_range


@functools.lru_cache(maxsize=32)
def _jitted(graphdef, which: str, opts: DecodeOptions, k: int = 0, cache_len: int = 0):
    """One compiled prefill/decode per (model structure, options, k, cache length)."""
    if which == "prefill":
        fn = functools.partial(prefill, graphdef, k=k, cache_len=cache_len, opts=opts)
        return jax.jit(fn)
    fn = functools.partial(decode, graphdef, opts=opts)
    return jax.jit(fn, donate_argnums=(1,))


def seed_keys(seeds: np.ndarray, k: int) -> jax.Array:
    """[B] request seeds -> [B*k, 2] keys: candidate j of request b uses fold_in(key(seed_b), j),
    so a request's samples do not depend on what else is in the batch."""
    base = jax.vmap(jax.random.PRNGKey)(jnp.asarray(seeds, jnp.uint32))
    keys = jax.vmap(lambda key: jax.vmap(lambda j: jax.random.fold_in(key, j))(jnp.arange(k)))(base)
    return keys.reshape(-1, 2).astype(jnp.uint32)


def check_prompts(prompts: list[list[int]], *, max_len: int, max_new: int) -> None:
    """Each prompt non-empty and within the model's budget with max_new tokens after it."""
    if not prompts:
        raise ValueError("no prompts given")
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise ValueError(f"prompt {i} is empty")
        if len(p) + max_new > max_len:
            raise ValueError(
                f"prompt {i} has {len(p)} tokens; with max_new_tokens={max_new} that exceeds "
                f"the model's max_len={max_len} (shorten the prompt or lower max_new_tokens)"
            )


def pad_prompts(prompts: list[list[int]], *, pad_id: int, max_len: int, max_new: int):
    """Left-pads token lists to a bucketed length; checks the budget. -> (tokens, valid) [B,P]."""
    check_prompts(prompts, max_len=max_len, max_new=max_new)
    width = min(bucket_length(max(len(p) for p in prompts)), max_len - max_new)
    width = max(width, max(len(p) for p in prompts))
    tokens = np.full((len(prompts), width), pad_id, np.int32)
    valid = np.zeros((len(prompts), width), bool)
    for i, p in enumerate(prompts):
        tokens[i, width - len(p) :] = p
        valid[i, width - len(p) :] = True
    return tokens, valid


@dataclasses.dataclass
class Candidates:
    """Sampler output on the host; shapes [B, k, ...] (B prompts, k candidates each)."""

    tokens: np.ndarray  # [B, k, G] int32 (pad after `length`)
    length: np.ndarray  # [B, k]
    finish: np.ndarray  # [B, k] int: index into FINISH_REASONS
    logprob: np.ndarray  # [B, k] sum of the tokens' log-probs, untruncated (`draw.draw`)
    step_scores: np.ndarray  # [B, k, S]
    step_index: np.ndarray  # [B, k, S] generated-token index of each step (-1: none)
    step_mask: np.ndarray  # [B, k, S] bool: the steps the inference scorer counts
    # [B, k, S, D] each step's penultimate feature (generate(keep_features=True)), else None
    step_features: np.ndarray | None = None

    def texts(self, tokenizer) -> list[list[str]]:
        return [
            [tokenizer.decode(t[:n].tolist()) for t, n in zip(tb, lb, strict=True)]
            for tb, lb in zip(self.tokens, self.length, strict=True)
        ]


def to_candidates(state: DecodeState, b: int, k: int) -> Candidates:
    mask = final_step_mask(state)
    features = state.step_features
    host = jax.device_get(
        (state.tokens, state.length, state.finish, state.logprob, state.step_scores,
         state.step_index, mask, features)
    )  # fmt: skip

    def shape(x):
        return None if x is None else np.asarray(x).reshape(b, k, *np.shape(x)[1:])

    return Candidates(*[shape(x) for x in host])


def generate(
    model,
    prompts: list[list[int]],
    *,
    k: int = 1,
    params: SamplingParams,
    step: StepTokens,
    seeds: list[int] | int = 0,
    pad_id: int | None = None,
    mesh: jax.sharding.Mesh | None = None,
    score_steps: bool = True,
    keep_features: bool = False,
    limits=None,
) -> Candidates:
    """Samples k candidates for each prompt (token id lists), with in-loop step scores.
    keep_features: also return each step's penultimate feature (`Candidates.step_features`).
    limits: [B, k] per-candidate length caps (<= max_new_tokens; None: max_new_tokens)."""
    state, opts, graphdef, model_state = start(
        model, prompts, k=k, params=params, step=step, seeds=seeds, pad_id=pad_id, mesh=mesh,
        score_steps=score_steps, keep_features=keep_features, limits=limits,
    )  # fmt: skip
    state = run_decode(graphdef, model_state, state, opts, mesh)
    return to_candidates(state, len(prompts), k)


def run_decode(graphdef, model_state, state: DecodeState, opts: DecodeOptions, mesh=None):
    """The compiled `decode` (one per model structure, options and cache size), on `mesh` if
    given; a cache that fills while candidates still run grows (`GROW_SLOTS`) and decoding
    goes on, until the cache is `opts.cache_len` long."""
    with _mesh_context(mesh):
        decode_fn = _jitted(graphdef, "decode", opts)
        state = decode_fn(model_state, state)
        while state.cache.max_len < opts.cache_len and bool(jnp.any(~state.done & ~state.paused)):
            state = _grow(state, _next_cache_len(state.cache.max_len, opts.cache_len))
            state = decode_fn(model_state, state)
    return state


def _next_cache_len(current: int, budget: int) -> int:
    return min(budget, 2 * current)  # a few sizes (compilations), each at most 2x the need


def _grow(state: DecodeState, cache_len: int) -> DecodeState:
    """The state with a cache of `cache_len` slots. Consumes `state` (as `decode`, which
    donates it): the cache grows one layer at a time and each layer's old k and v are freed
    once their grown copies exist, so one layer's old buffers sit beside the new cache, not the
    whole old cache (`metastone-jax plan` counts one layer's). Donation cannot free them: an
    input that no output of its shape can alias is not donated."""
    cache = state.cache
    slots = cache_len - cache.max_len
    ks, vs = [], []
    for k, v in zip(cache.k, cache.v, strict=True):
        grown = jax.block_until_ready(_grow_layer(k, v, slots))
        k.delete(), v.delete()
        ks.append(grown[0]), vs.append(grown[1])
    valid = _grow_valid(cache.valid, slots)
    return state.replace(cache=cache.replace(k=tuple(ks), v=tuple(vs), valid=valid))


@functools.partial(jax.jit, static_argnums=2)
def _grow_layer(k: jax.Array, v: jax.Array, slots: int) -> tuple[jax.Array, jax.Array]:
    k, v = grow_layer(k, v, slots)
    axes = ("batch", "kv_heads", None, None)  # as `_constrain` lays the cache
    return constrain(k, axes), constrain(v, axes)


@functools.partial(jax.jit, static_argnums=1)
def _grow_valid(valid: jax.Array, slots: int) -> jax.Array:
    return constrain(jnp.pad(valid, ((0, 0), (0, slots))), ("batch", None))


def start(
    model,
    prompts,
    *,
    k: int,
    params: SamplingParams,
    step: StepTokens,
    seeds: list[int] | int = 0,
    pad_id: int | None = None,
    mesh=None,
    score_steps: bool = True,
    until_step: bool = False,
    cache_extra: int = 0,
    keep_features: bool = False,
    limits=None,
) -> tuple[DecodeState, DecodeOptions, Any, Any]:
    """Validates, pads, prefills: -> (state, opts, graphdef, params) ready for `decode`."""
    cfg = model.cfg
    if k < 1:
        raise ValueError(f"k: expected >= 1 candidates per prompt, got {k}")
    if score_steps and model.sprm is None:
        raise ValueError("this model has no SPRM head (ModelConfig.sprm_head=False)")
    pad_id = _pad_id(cfg) if pad_id is None else pad_id
    g = params.max_new_tokens
    tokens, valid = pad_prompts(prompts, pad_id=pad_id, max_len=cfg.max_len, max_new=g)
    n = len(prompts) * k
    if mesh is not None:
        rows = mesh.shape["data"] * mesh.shape["fsdp"]
        if n % rows:
            raise ValueError(
                f"{len(prompts)} prompts x k={k} = {n} candidates cannot be laid on the mesh: "
                f"data*fsdp = {rows} must divide it (change k, the batch, or the mesh)"
            )
    # Each row's own cache holds what it generates; the prompt is a shared prefix.
    budget = min(g + cache_extra, cfg.max_len - tokens.shape[1])
    cache_len = min(budget, GROW_SLOTS) if GROW_SLOTS else budget
    seeds = [seeds] * len(prompts) if isinstance(seeds, int) else list(seeds)
    if len(seeds) != len(prompts):
        raise ValueError(f"seeds: expected one per prompt ({len(prompts)}), got {len(seeds)}")
    opts = DecodeOptions(
        params=params, step=step, pad_id=pad_id, until_step=until_step, score_steps=score_steps,
        keep_features=keep_features, cache_len=budget,
    )  # fmt: skip
    graphdef, model_state = nnx.split(model)
    with _mesh_context(mesh):
        state = _jitted(graphdef, "prefill", opts, k=k, cache_len=cache_len)(
            model_state, tokens, valid
        )
        state = state.replace(keys=seed_keys(np.asarray(seeds), k))
        if limits is not None:
            state = state.replace(limit=jnp.asarray(check_limits(limits, len(prompts), k, g)))
    return state, opts, graphdef, model_state


def check_limits(limits, b: int, k: int, max_new: int) -> np.ndarray:
    """Per-candidate length caps [B, k] -> [B*k] int32, each in [1, max_new_tokens]."""
    limits = np.asarray(limits)
    if limits.shape != (b, k):
        raise ValueError(f"limits: expected shape ({b}, {k}) (prompts x k), got {limits.shape}")
    if limits.min() < 1 or limits.max() > max_new:
        raise ValueError(f"limits: each must be in [1, max_new_tokens={max_new}]")
    return limits.reshape(-1).astype(np.int32)


def _pad_id(cfg) -> int:
    if cfg.pad_token_id is not None:
        return cfg.pad_token_id
    eos = cfg.eos_token_id
    return (eos[0] if isinstance(eos, tuple) else eos) if eos is not None else 0


def _mesh_context(mesh):
    return jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext()
