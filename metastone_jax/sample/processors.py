"""Logit processors and token sampling for the batched decode loop.

Pure jnp functions, jittable with `SamplingParams` static, for N sequences over a vocab of V.
The semantics follow Hugging Face `generate`:

    repetition penalty -> temperature -> top-k -> top-p -> categorical draw

with temperature 0 meaning greedy decoding (only the repetition penalty is applied, as HF
applies its warpers only when sampling). The repetition penalty takes a [N, V] presence mask
(`seen`) instead of token lists so that its cost does not grow with the sequence length.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp

NEG_INF = float("-inf")


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """Decoding settings; frozen and hashable so that it can be a static jit argument.

    temperature: 0 = greedy, otherwise logits are divided by it before sampling.
    top_p: nucleus mass, 1.0 = off. top_k: 0 = off. repetition_penalty: 1.0 = off.
    max_new_tokens: generation length cap. stop_ids: tokens that end a sequence.
    think_budget: max tokens inside <think>...</think> before `</think>` is forced; None = off.
    """

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    max_new_tokens: int = 512
    stop_ids: tuple[int, ...] = ()
    think_budget: int | None = None

    def __post_init__(self):
        def is_real(x):
            return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)

        def is_int(x):
            return isinstance(x, int) and not isinstance(x, bool)

        if not (is_real(self.temperature) and self.temperature >= 0):
            raise ValueError(
                f"SamplingParams.temperature must be a finite number >= 0 (0 = greedy), "
                f"got {self.temperature!r}"
            )
        if not (is_real(self.top_p) and 0 < self.top_p <= 1):
            raise ValueError(
                f"SamplingParams.top_p must be a number in (0, 1] (1.0 = off), got {self.top_p!r}"
            )
        if not (is_int(self.top_k) and self.top_k >= 0):
            raise ValueError(
                f"SamplingParams.top_k must be an integer >= 0 (0 = off), got {self.top_k!r}"
            )
        if not (is_real(self.repetition_penalty) and self.repetition_penalty > 0):
            raise ValueError(
                "SamplingParams.repetition_penalty must be a finite number > 0 (1.0 = off), "
                f"got {self.repetition_penalty!r}"
            )
        if not (is_int(self.max_new_tokens) and self.max_new_tokens >= 1):
            raise ValueError(
                f"SamplingParams.max_new_tokens must be an integer >= 1, "
                f"got {self.max_new_tokens!r}"
            )
        # Accept any iterable of ints but store a tuple, so the params stay hashable.
        try:
            stop_ids = tuple(self.stop_ids)
        except TypeError:
            stop_ids = None
        if stop_ids is None or not all(is_int(t) and t >= 0 for t in stop_ids):
            raise ValueError(
                f"SamplingParams.stop_ids must be a tuple of token ids >= 0, got {self.stop_ids!r}"
            )
        object.__setattr__(self, "stop_ids", stop_ids)
        if self.think_budget is not None and not (
            is_int(self.think_budget) and self.think_budget >= 0
        ):
            raise ValueError(
                f"SamplingParams.think_budget must be None or an integer >= 0, "
                f"got {self.think_budget!r}"
            )

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def seen_from_tokens(tokens: jax.Array, vocab_size: int, valid: jax.Array | None = None):
    """Presence mask of token ids. tokens: [N, T] int; valid: [N, T] bool or None -> [N, V] bool.

    Ids outside [0, V) are ignored (HF likewise drops ids beyond the logits' vocab).
    """
    n = tokens.shape[0]
    ok = (tokens >= 0) & (tokens < vocab_size)
    if valid is not None:
        ok &= valid
    # Route ignored entries to index V, which mode="drop" discards (negative indices would wrap).
    idx = jnp.where(ok, tokens, vocab_size)
    seen = jnp.zeros((n, vocab_size), bool)
    return seen.at[jnp.arange(n)[:, None], idx].set(True, mode="drop")


def update_seen(seen: jax.Array, token: jax.Array) -> jax.Array:
    """Marks each row's new token as seen. seen: [N, V] bool; token: [N] int -> [N, V] bool.

    Out-of-range tokens (e.g. a negative pad id for finished rows) leave the row unchanged.
    """
    n, v = seen.shape
    idx = jnp.where((token >= 0) & (token < v), token, v)
    return seen.at[jnp.arange(n), idx].set(True, mode="drop")


def apply_repetition_penalty(logits: jax.Array, seen: jax.Array, penalty: float) -> jax.Array:
    """HF repetition penalty. logits: [N, V] f32; seen: [N, V] bool -> [N, V].

    Seen tokens with a negative score are multiplied by `penalty`, others divided by it, so a
    penalty > 1 always makes a seen token less likely (and < 1 more likely). Applied once per
    token regardless of how often it occurred, as in HF.
    """
    if penalty == 1.0:
        return logits
    penalized = jnp.where(logits < 0, logits * penalty, logits / penalty)
    return jnp.where(seen, penalized, logits)


def apply_temperature(logits: jax.Array, temperature: float) -> jax.Array:
    """logits / temperature, [N, V] -> [N, V]; temperature must be > 0."""
    if temperature == 1.0:
        return logits
    return logits / jnp.asarray(temperature, logits.dtype)


def top_k_mask(logits: jax.Array, top_k: int) -> jax.Array:
    """HF top-k: [N, V] -> [N, V] with every logit below the k-th largest set to -inf.

    Ties with the k-th largest value are all kept (so more than k may survive); k >= V and
    k == 0 are no-ops.
    """
    v = logits.shape[-1]
    k = min(top_k, v)
    if k <= 0 or k == v:
        return logits
    if k <= SMALL_TOP_K:
        kth = _kth_largest(logits, k)
    else:
        kth = jax.lax.top_k(logits, k)[0][..., -1:]
    return jnp.where(logits < kth, NEG_INF, logits)


# Up to this k, the k-th largest logit comes from k max-and-count passes over the row instead of
# `lax.top_k`, which XLA:CPU lowers to a full sort for k > 1: 13 ms on the demo's [256, 512]
# logits (half of its decode step), 340 ms on [128, 16000], against 0.2 and 1.5 ms for k = 3
# (bench/top_k_bench.py, bench/RESULTS.md). A pass costs about V/100 us per 128 rows here.
SMALL_TOP_K = 64


def _kth_largest(x: jax.Array, k: int) -> jax.Array:
    """[N, V] -> [N, 1]: the k-th largest entry counting repeats (= lax.top_k(x, k)[0][:, -1])."""

    def next_value(i, carry):
        bound, count, kth = carry
        # The largest value below the last one taken (the maximum on the first pass) and how
        # many entries equal it; the k-th largest is the value at which the count reaches k.
        below = (x < bound) | (i == 0)
        value = jnp.max(jnp.where(below, x, NEG_INF), axis=-1, keepdims=True)
        kth = jnp.where(count < k, value, kth)
        count = count + jnp.sum(x == value, axis=-1, keepdims=True)
        return value, count, kth

    shape = (*x.shape[:-1], 1)
    init = (jnp.full(shape, jnp.inf, x.dtype), jnp.zeros(shape, jnp.int32),
            jnp.full(shape, NEG_INF, x.dtype))  # fmt: skip
    return jax.lax.fori_loop(0, k, next_value, init)[2]


def _sortable_key(x: jax.Array) -> jax.Array:
    """f32 -> int32 with the same order (flip the magnitude bits of negatives). -0.0 maps to
    the key of +0.0: they compare equal, as in a sort (and the key of max(x) is max(key))."""
    bits = jax.lax.bitcast_convert_type(jnp.where(x == 0, jnp.zeros_like(x), x), jnp.int32)
    return jnp.where(bits < 0, bits ^ jnp.int32(0x7FFFFFFF), bits)


# Top-p runs over blocks of rows of about this many logits (2 MiB of f32): its ~33 passes
# then reread a block that stays in cache, not the whole [N, V] (bench/RESULTS.md, 1.15x per
# decode step at [128, 16000]). 0 = always one block.
TOP_P_BLOCK_ELEMENTS = 1 << 19


def top_p_mask(logits: jax.Array, top_p: float) -> jax.Array:
    """HF nucleus filter: [N, V] -> [N, V] with tokens outside the top-p mass set to -inf.

    Like HF: sort ascending, drop the prefix whose cumulative probability is <= 1 - top_p, and
    always keep the most likely token (min_tokens_to_keep=1). So the boundary token that makes
    the kept mass reach top_p is kept. Ties are ordered by index (stable sort: among equal
    logits the lower ids are dropped first), which is what torch's CPU sort does on small rows;
    torch's order for large rows of ties is unspecified. top_p == 1 is a no-op (HF only adds
    the warper for top_p < 1).

    No sort (slow on CPU and in a decode loop): the cut value is found by bisection over the
    32-bit order-preserving integer image of the logits (32 masked sums, exact), then ties at
    the cut are resolved in id order as the stable sort would. Large batches find the cut over
    blocks of rows that stay in cache across those passes (`TOP_P_BLOCK_ELEMENTS`); the mask is
    then applied to the whole batch at once.
    """
    if top_p >= 1.0:
        return logits
    n, v = logits.shape[0], logits.shape[-1]
    rows = _block_rows(n, v) if logits.ndim == 2 else n
    # Not under a mesh: mapping over row blocks would serialise the sharded batch axis.
    if rows < n and jax.sharding.get_abstract_mesh().empty:
        blocks = logits.reshape(n // rows, rows, v)
        cut, first = jax.lax.map(functools.partial(_top_p_cut, top_p=top_p), blocks)
        cut, first = cut.reshape(n, 1), first.reshape(n, 1)
    else:
        cut, first = _top_p_cut(logits, top_p)
    keys = _sortable_key(logits)
    iota = jax.lax.broadcasted_iota(jnp.int32, logits.shape, logits.ndim - 1)
    keep = (keys > cut) | ((keys == cut) & (iota >= first))
    return jnp.where(keep, logits, NEG_INF)


def _block_rows(n: int, v: int) -> int:
    """Rows per top-p block for n rows of v logits: the largest divisor of n holding at most
    TOP_P_BLOCK_ELEMENTS logits, but at least 8 rows (tiny blocks loop too long); n (one
    block) when n rows fit, blocking is off, or no such divisor exists."""
    if not TOP_P_BLOCK_ELEMENTS:
        return n
    target = max(8, TOP_P_BLOCK_ELEMENTS // v)
    if target >= n:
        return n
    return max((d for d in range(8, target + 1) if n % d == 0), default=n)


def _top_p_cut(logits: jax.Array, top_p: float) -> tuple[jax.Array, jax.Array]:
    """Where the nucleus of each row of a block [R, V] starts: (cut, first) [R, 1] int32.

    The filter keeps key > cut, and key == cut from token id `first` on (ties at the cut go
    in id order; first = 0 without ties)."""
    top = jnp.max(logits, axis=-1, keepdims=True)
    shifted = jnp.exp(logits - top)
    probs = shifted / jnp.sum(shifted, axis=-1, keepdims=True)  # = jax.nn.softmax
    keys = _sortable_key(logits)
    drop_mass = 1.0 - top_p

    def mass_at_or_below(k):  # [N, 1] key -> [N, 1] probability mass of logits <= it
        # multiply by the 0/1 mask, not select: XLA CPU fuses it into a faster reduction.
        return jnp.sum(probs * (keys <= k), axis=-1, keepdims=True)

    # Smallest key whose mass at-or-below exceeds 1 - top_p: the value of the cut token.
    # Bounds from float reductions (integer ones are slow on CPU): no key is below INT32_MIN
    # (only a NaN's), and the key of the largest logit is the largest key (mass 1).
    hi = _sortable_key(top)
    lo = jnp.full_like(hi, jnp.iinfo(jnp.int32).min)

    def bisect(_, bounds):
        lo, hi = bounds
        mid = (lo >> 1) + (hi >> 1) + (lo & hi & 1)  # floor((lo + hi) / 2) without overflow
        above = mass_at_or_below(mid) > drop_mass
        return jnp.where(above, lo, mid), jnp.where(above, mid, hi)

    _, cut = jax.lax.fori_loop(0, 32, bisect, (lo, hi))
    at_cut = keys == cut

    def resolve_ties(_):
        below = jnp.sum(jnp.where(keys < cut, probs, 0.0), axis=-1, keepdims=True)
        # Tied tokens at the cut sort by id; the j-th (1-based) has cumulative mass
        # below + j * p, so the kept ones are those from some id on. (A cumsum over V is slow
        # on CPU, so this runs only with ties.)
        rank = jnp.cumsum(at_cut, axis=-1)
        # The most likely token (last in ascending stable order) is always kept.
        iota = jax.lax.broadcasted_iota(jnp.int32, logits.shape, logits.ndim - 1)
        top_id = jnp.max(jnp.where(keys == hi, iota, -1), axis=-1, keepdims=True)
        kept = at_cut & ((below + rank * probs > drop_mass) | (iota == top_id))
        v = logits.shape[-1]
        return jnp.min(jnp.where(kept, iota, v), axis=-1, keepdims=True).astype(jnp.int32)

    # Without ties at the cut, the cut token itself is kept (mass at-or-below it exceeds
    # 1 - top_p by construction) and so is every larger one, the maximum included.
    ties = jnp.any(jnp.sum(at_cut, axis=-1) > 1)
    first = jax.lax.cond(ties, resolve_ties, lambda _: jnp.zeros_like(cut), None)
    return cut, first


def process_logits(logits: jax.Array, seen: jax.Array, params: SamplingParams) -> jax.Array:
    """Applies penalty -> temperature -> top-k -> top-p. [N, V] (any float), [N, V] bool -> f32.

    For greedy params (temperature 0) only the repetition penalty is applied: truncation and
    scaling cannot change the argmax, and the log-prob `sample` reports is then that of the
    (penalized) model distribution.
    """
    # f32 for the softmax/cumsum in top-p and for the sampled log-probs.
    logits = logits.astype(jnp.float32)
    logits = apply_repetition_penalty(logits, seen, params.repetition_penalty)
    if params.greedy:
        return logits
    logits = apply_temperature(logits, params.temperature)
    logits = top_k_mask(logits, params.top_k)
    return top_p_mask(logits, params.top_p)


def _inverse_cdf(probs: jax.Array, u: jax.Array) -> jax.Array:
    """Token whose CDF interval holds u * total: probs [N, V] (any scale), u [N] in [0, 1) -> [N].

    One uniform per row instead of V Gumbel variates. Two levels (block sums, then one block)
    instead of a cumsum over V, which is slow on CPU. Tokens with probability 0 have empty
    intervals, so they are never drawn."""
    return _inverse_cdf_from_blocks(*cdf_blocks(probs), u)


def cdf_blocks(probs: jax.Array, block: int = 128) -> tuple[jax.Array, jax.Array]:
    """probs [N, V] -> (blocks [N, V/B, B] zero-padded, their cumulative sums [N, V/B])."""
    n, v = probs.shape
    pad = -v % block
    blocks = jnp.pad(probs, ((0, 0), (0, pad))).reshape(n, -1, block)
    return blocks, jnp.cumsum(jnp.sum(blocks, axis=-1), axis=-1)


def _inverse_cdf_from_blocks(blocks: jax.Array, block_cdf: jax.Array, u: jax.Array):
    """`_inverse_cdf` from `cdf_blocks` (several draws from one distribution share them)."""
    block = blocks.shape[-1]
    target = u * block_cdf[:, -1]
    b = jnp.minimum(jnp.sum(block_cdf <= target[:, None], axis=-1), block_cdf.shape[1] - 1)
    before = jnp.where(
        b > 0, jnp.take_along_axis(block_cdf, jnp.maximum(b - 1, 0)[:, None], 1)[:, 0], 0.0
    )
    row = jnp.take_along_axis(blocks, b[:, None, None], axis=1)[:, 0]  # [N, B]
    j = jnp.sum(jnp.cumsum(row, axis=-1) <= (target - before)[:, None], axis=-1)
    # Rounding can put the target past a block's last non-zero entry: step back onto it.
    last_nonzero = block - 1 - jnp.argmax((row > 0)[:, ::-1], axis=-1)
    return (b * block + jnp.minimum(j, last_nonzero)).astype(jnp.int32)


def softmax_parts(logits: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """logits [N, V] f32 -> (max [N, 1], exp(logits - max) [N, V], their sum [N]).

    log p(token) = logit - max - log(sum): one reduction, no [N, V] log-softmax."""
    top = jnp.max(logits, axis=-1, keepdims=True)
    shifted = jnp.exp(logits - top)
    return top, shifted, jnp.sum(shifted, axis=-1)


def sample(
    logits: jax.Array, keys: jax.Array, params: SamplingParams
) -> tuple[jax.Array, jax.Array]:
    """Draws one token per row from processed logits (the output of `process_logits`).

    logits: [N, V]; keys: [N, 2] uint32 (or [N] typed keys), one PRNG key per row.
    Returns (token [N] int32, logprob [N] f32).

    Sampling (temperature > 0): a categorical draw from softmax(logits), each row with its own
    key, so a row's token depends only on its logits and key, never on the rest of the batch;
    logprob is the token's log-probability under that processed distribution (after
    temperature and truncation). Greedy (temperature 0): argmax (lowest id on ties), keys
    unused; logprob is under softmax(logits) at temperature 1, i.e. the raw model distribution
    (with the repetition penalty, if any, applied).
    """
    logits = logits.astype(jnp.float32)
    top, shifted, total = softmax_parts(logits)
    if params.greedy:
        token = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    else:
        u = jax.vmap(lambda key: jax.random.uniform(key, ()))(keys)
        token = _inverse_cdf(shifted / total[:, None], u)
    chosen = jnp.take_along_axis(logits, token[:, None], axis=-1)[:, 0]
    return token, chosen - top[:, 0] - jnp.log(total)
