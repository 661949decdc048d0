"""The rollout engine's memory per device (sample/engine.py) and the layout the planner picks.

The formulas are stated in planning/memory.py's docstring (the rollout section); this module
computes them. One engine runs over the whole mesh (`engine._constrain`): its S slots laid over
('data', 'fsdp') as far as S divides them, its pages whole on every device (a slot reads any
page), kv heads over 'tensor'.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx

from metastone_jax.attention import segment_kv
from metastone_jax.config import ModelConfig
from metastone_jax.model import abstract_model
from metastone_jax.planning import occupancy as occ
from metastone_jax.planning.memory import Component, Workload, _split, causal_keys_per_query
from metastone_jax.sample import engine, sampler
from metastone_jax.sample.processors import SamplingParams
from metastone_jax.sharding import logical_to_spec
from metastone_jax.sprm.steps import StepTokens

LANES = 128  # attention/paged_tpu.py: the pallas pool pads head_dim to a multiple of this
MAX_SLOTS = 256  # rl.slots = 0: every rollout at once, up to this many (EngineConfig.slots)
POOL_FRACTION = 0.9  # of HBM, for the whole rollout phase when the planner sizes the pool
SMALL_PER_SLOT = 86  # DecodeState's [S] fields (12 x 4-byte, RunningScore 6 x 4, keys 8,
#                      done/paused 2) + the page table's kv_len (4)
START_INTS = 6  # the question table's int32 start fields (prompt_len, prev, think counters)


def logits_copies(top_p: float) -> int:
    """fp32 [S, V] arrays the segment keeps besides the state: 2 (the LM head's logits and the
    updated next logits); nucleus sampling (top_p < 1, sample/draw.py) keeps 4 more."""
    return 2 if top_p >= 1.0 else 6


def pallas_serves(cfg: ModelConfig, tp: int) -> bool:
    """The TPU kernel's tile rule (paged_tpu._check_kv_heads) for the kv heads on a device."""
    packing = 4 // cfg.compute_jnp_dtype.itemsize
    rows = 2 * _split(cfg.n_kv_heads, tp)
    return rows % packing == 0 and (rows // packing in (1, 2, 4, 8) or (rows // packing) % 8 == 0)


def page_bytes(cfg: ModelConfig, page: int, tp: int, impl: str) -> int:
    """One page over all layers, keys and values, on one device."""
    c = cfg.compute_jnp_dtype.itemsize
    kh = _split(cfg.n_kv_heads, tp)
    hd = cfg.head_dim if impl == "xla" else -(-cfg.head_dim // LANES) * LANES
    return 2 * cfg.n_layers * kh * hd * page * c


def slot_state_bytes(cfg: ModelConfig, slots: int, columns: int, pages: int, g: int) -> int:
    """DecodeState rows of S slots (no step features) + the page table + the free-page list."""
    c = cfg.compute_jnp_dtype.itemsize
    v, s_max = cfg.vocab_size, max(1, (g + 1) // 2)
    per_slot = 5 * v + c * cfg.d_model + 4 * g + 8 * s_max + 4 * columns + SMALL_PER_SLOT
    return slots * per_slot + 4 * pages + 4


def question_table_bytes(cfg: ModelConfig, slots: int) -> int:
    """2S rows of a prefill's start fields: next logits (fp32), seen (bool), feature, ints."""
    c = cfg.compute_jnp_dtype.itemsize
    return 2 * slots * (5 * cfg.vocab_size + c * cfg.d_model + 4 * START_INTS)


def segment_work_bytes(cfg: ModelConfig, slots: int, page: int, tp: int, impl: str,
                       top_p: float, working_set: int = 0) -> int:  # fmt: skip
    """The jitted segment's temporaries beyond its weights (memory.py docstring); slots: on
    this device. working_set: `working_set_bytes` (the xla layout's)."""
    c = cfg.compute_jnp_dtype.itemsize
    kh = _split(cfg.n_kv_heads, tp)
    rows = slots * cfg.vocab_size * (4 * logits_copies(top_p) + 1)
    group = cfg.n_heads // cfg.n_kv_heads
    if impl == "xla":  # one page column: keys gathered in fp32, values in c, scores twice
        attend = slots * kh * (cfg.head_dim * page * (4 + c) + 2 * 4 * group * page)
    else:  # the kernel's blocks live in VMEM; q padded to the lanes and its output, fp32
        attend = 2 * slots * kh * group * -(-cfg.head_dim // LANES) * LANES * 4
    return rows + attend + working_set


def working_set_bytes(cfg: ModelConfig, *, slots: int, rows: int, tp: int, k: int,
                      prompt_len: int, page: int, steps: int) -> int:  # fmt: skip
    """The xla layout's dense working set while a segment runs (attention/segment_kv.py), keys
    and values of every layer: the segment's tokens in chunks, `rows` slots on this device,
    and its blocks' prompt copies (blocks of all `slots`, whole on every device)."""
    c = cfg.compute_jnp_dtype.itemsize
    per_token = 2 * _split(cfg.n_kv_heads, tp) * cfg.head_dim * c  # k and v, one layer
    tail = segment_kv.chunks(steps) * segment_kv.chunk_width(steps)
    blocks = segment_kv.block_count(slots, segment_kv.rows_per_block(k))
    prompt = math.ceil(prompt_len / page) * page
    return per_token * cfg.n_layers * (rows * tail + blocks * prompt)


def prefill_work_bytes(cfg: ModelConfig, rows: int, t: int, tp: int) -> int:
    """A prefill of `rows` prompts of t tokens: one layer's scores and probabilities and its
    MLP hidden, every layer's keys and values before they are paged, the last position's
    logits and seen mask (memory.py docstring)."""
    c = cfg.compute_jnp_dtype.itemsize
    kh = _split(cfg.n_kv_heads, tp)
    scores = _split(cfg.n_heads, tp) * causal_keys_per_query(t)
    layer = rows * t * ((4 + c) * scores + c * _split(cfg.d_ff, tp))
    kv = 2 * cfg.n_layers * rows * kh * t * cfg.head_dim * c
    return int(layer + kv + rows * cfg.vocab_size * (5 + c))


def _block_param_bytes(cfg: ModelConfig) -> int:
    """The L stacked blocks' parameters in the param dtype."""
    d, h, k, hd, f = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.d_ff
    attn = d * (h + 2 * k) * hd + h * hd * d + (h + 2 * k) * hd * int(cfg.qkv_bias)
    return cfg.n_layers * (attn + 3 * d * f + 2 * d) * cfg.param_jnp_dtype.itemsize


def replaced_param_bytes(cfg: ModelConfig) -> int:
    """The parameters a CPU decode segment does not read because `decode_weight_bytes` stands
    in for them (XLA drops unused arguments): the stacked blocks, the untied LM head, a 16-bit
    embedding."""
    p = cfg.param_jnp_dtype.itemsize
    head = 0 if cfg.tie_embeddings else cfg.vocab_size * cfg.d_model * p
    embed = cfg.vocab_size * cfg.d_model * p if p == 2 else 0
    return _block_param_bytes(cfg) + head + embed


def decode_weight_bytes(cfg: ModelConfig) -> int:
    """The CPU path's decode copy of the weights (`Transformer.decode_weights`): the L blocks'
    Linear kernels in the compute dtype (norms and biases as stored), + the untied LM head,
    + a 16-bit embedding's integer view."""
    d, h, k, hd, f = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.d_ff
    kernels = d * (h + 2 * k) * hd + h * hd * d + 3 * d * f
    rest = (h + 2 * k) * hd * int(cfg.qkv_bias) + 2 * d
    c, p = cfg.compute_jnp_dtype.itemsize, cfg.param_jnp_dtype.itemsize
    head = 0 if cfg.tie_embeddings else cfg.vocab_size * d * c
    embed_bits = cfg.vocab_size * d * p if p == 2 else 0  # a 16-bit table, gathered as ints
    return cfg.n_layers * (kernels * c + rest * p) + head + embed_bits


def rows_on_device(n: int, mesh_shape: dict) -> int:
    """Rows of an [n, ...] slot array on one device: over ('data', 'fsdp') as far as n divides
    them (`sharding.constrain` drops an axis that does not divide), else replicated."""
    spec = logical_to_spec(("batch",), (n,), mesh_shape, strict=False)
    axes = spec[0] if spec else None
    axes = () if axes is None else (axes,) if isinstance(axes, str) else axes
    return n // math.prod(mesh_shape.get(a, 1) for a in axes)


@dataclasses.dataclass(frozen=True)
class EnginePlan:
    """The engine's layout over the mesh and its expected schedule."""

    candidates: int  # rollouts per step
    prompts: int
    slots: int  # on the whole mesh
    slots_per_device: int  # rows of the slot arrays on one device
    pages: int  # the pool: whole on every device
    page_size: int
    columns: int  # page-table width: pages of the longest sequence
    impl: str  # pool layout: "pallas" (TPU kernel) or "xla"
    page_bytes: int  # one page on one device
    slots_from: str  # "rl.slots" or "chosen"
    pages_from: str  # "rl.pages", "rl.memory_fraction" or "chosen"
    default_pages: int  # the engine's own default: every slot's whole budget
    prefill_rows: int  # prompts prefilled together (the whole batch, all devices)
    prefill_rows_per_device: int
    occupancy: occ.Occupancy | None

    @property
    def tokens(self) -> int:
        return self.pages * self.page_size


def default_pages(slots: int, columns: int, prompts: int, prompt_pages: int) -> int:
    """engine.plan_layout with pages = 0 and no memory_fraction."""
    return engine.default_pages(slots, columns, min(slots, prompts), prompt_pages)


def slots_for_pool(pages: int, cap: int, k: int, prompt_len: int, max_new: int,
                   page: int, prompts: int) -> int:  # fmt: skip
    """The most slots (<= cap, >= 1) whose candidates, all started together (as the first fill
    starts them), fit the pool with their questions' prompt pages when one runs to the budget
    and the others stop at the mean response length (memory.py docstring)."""
    mean = occ.mean_capped_lognormal(max_new)
    full = prompt_len // page
    own_mean = math.ceil((prompt_len + mean) / page) - full
    own_max = math.ceil((prompt_len + max_new) / page) - full
    prompt_pages = math.ceil(prompt_len / page)
    best = 1
    for s in range(1, cap + 1):
        if min(prompts, math.ceil(s / k)) * prompt_pages + (s - 1) * own_mean + own_max <= pages:
            best = s
    return best


def plan_engine(
    cfg: ModelConfig, *, candidates: int, k: int, prompt_len: int, max_new: int, slots: int,
    pages: int, page_size: int, memory_fraction: float, top_p: float, mesh_shape: dict,
    hbm: int, resident: int, weights: int, simulate: bool = True,
) -> EnginePlan:  # fmt: skip
    """Slots and pages of the engine over the mesh, given the bytes the rollout phase holds
    besides the engine (the resident state, the decode weights). rl.slots / rl.pages as given
    when > 0; else the rules of memory.py's docstring."""
    fixed = resident + weights
    dp, tp = mesh_shape["data"] * mesh_shape["fsdp"], mesh_shape["tensor"]
    n = candidates
    prompts = math.ceil(n / k)
    page = page_size
    columns = math.ceil((prompt_len + max_new) / page)
    prompt_pages = math.ceil(prompt_len / page)
    impl = "pallas" if pallas_serves(cfg, tp) else "xla"
    pb = page_bytes(cfg, page, tp, impl)

    def prefill_rows(s):  # the first fill's batch, padded to a power of 2 as the engine pads
        return 1 << max(0, math.ceil(math.log2(min(prompts, math.ceil(s / k)))))

    def others(s):  # the rollout phase's bytes besides the pool, per device
        rows = rows_on_device(s, mesh_shape)
        work = max(segment_work_bytes(cfg, rows, page, tp, impl, top_p,
                                      engine_working_set(cfg, impl, s, rows, tp, k, prompt_len,
                                                         page, max_new, n)),  # fmt: skip
                   prefill_work_bytes(cfg, rows_on_device(prefill_rows(s), mesh_shape),
                                      prompt_len, tp))  # fmt: skip
        state = slot_state_bytes(cfg, rows, columns, 0, max_new) + question_table_bytes(cfg, s)
        return fixed + state + work

    def pool_pages(s):
        full = default_pages(s, columns, prompts, prompt_pages)
        if pages:
            return pages, "rl.pages"
        if memory_fraction > 0:  # engine.pages_for_memory: free memory / all kv heads' page
            room = memory_fraction * max(0, hbm - resident)
            return min(full, int(room // page_bytes(cfg, page, 1, impl))), "rl.memory_fraction"
        fit = int((POOL_FRACTION * hbm - others(s)) // (pb + 4))
        return max(min(full, fit), columns + 1), "chosen"

    def choose(p, cap):  # the rule, then whole rows on every row device when there are enough
        s = slots_for_pool(p, cap, k, prompt_len, max_new, page, prompts)
        return s - s % dp if s >= dp else s

    cap = slots or min(n, MAX_SLOTS)
    s, slots_from = cap, "rl.slots" if slots else "chosen"
    p, pages_from = pool_pages(s)
    if not slots:
        s = choose(p, cap)
        p, pages_from = pool_pages(s)
        wider = choose(p, cap)  # the smaller slot terms may leave room for more slots
        if wider > s and choose(pool_pages(wider)[0], cap) >= wider:
            s = wider
            p, pages_from = pool_pages(s)
    sim = None
    if simulate and p >= columns + 1:
        sim = occ.simulate(n, k, prompt_len, max_new, s, p, page)
    return EnginePlan(
        candidates=n, prompts=prompts, slots=s, slots_per_device=rows_on_device(s, mesh_shape),
        pages=p, page_size=page, columns=columns, impl=impl, page_bytes=pb,
        slots_from=slots_from, pages_from=pages_from,
        default_pages=default_pages(s, columns, prompts, prompt_pages),
        prefill_rows=prefill_rows(s),
        prefill_rows_per_device=rows_on_device(prefill_rows(s), mesh_shape), occupancy=sim,
    )  # fmt: skip


def engine_working_set(cfg: ModelConfig, impl: str, slots: int, rows: int, tp: int, k: int,
                       prompt_len: int, page: int, max_new: int,
                       candidates: int) -> int:  # fmt: skip
    """`working_set_bytes` at the engine's segment length (its default, at most the budget
    `max_new`); 0 in the pallas layout, or with more candidates than slots."""
    if impl != "xla" or candidates > slots:  # engine.plan_layout: only without a queue
        return 0
    steps = min(engine.DEFAULT_SEGMENT_STEPS, max_new)
    return working_set_bytes(cfg, slots=slots, rows=rows, tp=tp, k=k, prompt_len=prompt_len,
                             page=page, steps=steps)  # fmt: skip


def rollout_components(cfg: ModelConfig, w: Workload, mesh_shape: dict, hbm: int, resident: int,
                       weights: int) -> tuple[EnginePlan, list[Component]]:  # fmt: skip
    """The engine's layout and the rollout phase's components (memory.py docstring), given
    the resident state's and the decode weights' bytes."""
    tp = mesh_shape["tensor"]
    g, p = w.kv_len - w.prompt_len, w.prompt_len
    eng = plan_engine(
        cfg, candidates=w.candidates, k=w.k, prompt_len=p, max_new=g, slots=w.slots,
        pages=w.pages, page_size=w.page_size, memory_fraction=w.memory_fraction, top_p=w.top_p,
        mesh_shape=mesh_shape, hbm=hbm, resident=resident, weights=weights,
    )  # fmt: skip
    s, rows, page = eng.slots, eng.slots_per_device, eng.page_size
    v = cfg.vocab_size
    prefill = prefill_work_bytes(cfg, eng.prefill_rows_per_device, p, tp)
    working_set = engine_working_set(cfg, eng.impl, s, rows, tp, w.k, p, page, g, w.candidates)
    return eng, [
        Component(
            "page pool", "rollout", eng.pages * eng.page_bytes,
            f"{eng.pages} pages x {page} tokens, {eng.impl} layout, "
            f"{eng.page_bytes / 2**20:.2f} MiB/page/device ({eng.pages_from})",
        ),
        Component(
            "slot state", "rollout", slot_state_bytes(cfg, rows, eng.columns, eng.pages, g),
            f"{rows} of {s} slots ({eng.slots_from}): [{v}] logits + seen, {g} tokens, step "
            "scores",
        ),
        Component("question table", "rollout", question_table_bytes(cfg, s),
                  f"{2 * s} prompts' start fields"),
        Component("decode weights", "rollout", weights,
                  f"the weights gathered over fsdp {mesh_shape['fsdp']} for the loops"),
        Component(
            "segment work", "rollout*",
            segment_work_bytes(cfg, rows, page, tp, eng.impl, w.top_p, working_set),
            f"[{rows}, {v}] fp32 x{logits_copies(w.top_p)} + a page column per layer"
            + (" + the segment's dense working set" if working_set else ""),
        ),
        Component("prefill work", "rollout*", prefill,
                  f"{eng.prefill_rows_per_device} of {eng.prefill_rows} prompts x {p} tokens, "
                  "one layer + all layers' k, v"),
    ]  # fmt: skip


def cpu_segment_bytes(cfg: ModelConfig, *, params: int, slots: int, pages: int, page: int,
                      columns: int, max_new: int, top_p: float, k: int,
                      prompt_len: int) -> int:  # fmt: skip
    """The planner's figure for `engine.segment` compiled on one CPU device (xla layout): its
    arguments (the params it reads, the decode copy of the weights, pool, slot state, free
    list) + its temporaries (the segment's work). What bench/engine_memory.py and tests/test_plan.py
    compare with XLA's memory analysis."""
    working_set = engine_working_set(cfg, "xla", slots, slots, 1, k, prompt_len, page, max_new,
                                     slots)  # fmt: skip
    return (
        params
        - replaced_param_bytes(cfg)
        + decode_weight_bytes(cfg)
        + pages * page_bytes(cfg, page, 1, "xla")
        + slot_state_bytes(cfg, slots, columns, pages, max_new)
        + segment_work_bytes(cfg, slots, page, 1, "xla", top_p, working_set)
    )


def xla_segment_bytes(cfg: ModelConfig, *, slots: int, pages: int, page: int, prompt_len: int,
                      max_new: int, top_p: float, k: int) -> dict:  # fmt: skip
    """XLA's memory analysis of `engine.segment` lowered and compiled on abstract shapes (one
    device of the default backend, xla layout, nothing allocated): {argument, output, alias,
    temp, total = argument + output - alias + temp} (the state is donated: its output aliases
    its argument)."""
    graphdef, model_state = nnx.split(abstract_model(cfg))
    weights = jax.eval_shape(lambda st: engine.decode_weights(nnx.merge(graphdef, st)),
                             model_state)  # fmt: skip
    params = SamplingParams(temperature=1.0, top_p=top_p, max_new_tokens=max_new, stop_ids=(1,))
    opts = sampler.DecodeOptions(params=params, step=StepTokens((5,), 6, 7), pad_id=0)
    columns = math.ceil((prompt_len + max_new) / page)
    layout = engine.Layout(slots, page, pages, columns, "xla")
    state = jax.eval_shape(functools.partial(engine.empty_state, cfg, layout, opts))
    steps = min(engine.DEFAULT_SEGMENT_STEPS, max_new)
    fn = functools.partial(engine.segment, graphdef, opts=opts, steps=steps)
    r = segment_kv.rows_per_block(k)
    n_blocks = segment_kv.block_count(slots, r)

    def ints(*shape):
        return jax.ShapeDtypeStruct(shape, jnp.int32)

    blocks = (ints(n_blocks, r), ints(n_blocks, math.ceil(prompt_len / page)), ints(n_blocks),
              ints(slots), ints(slots))  # fmt: skip
    compiled = (
        jax.jit(fn, donate_argnums=(2,))
        .lower(model_state, weights, state, ints(pages), ints(), ints(), ints(slots), ints(),
               blocks)
        .compile()
    )  # fmt: skip
    m = compiled.memory_analysis()
    out = {
        "argument": m.argument_size_in_bytes,
        "output": m.output_size_in_bytes,
        "alias": m.alias_size_in_bytes,
        "temp": m.temp_size_in_bytes,
    }
    out["total"] = out["argument"] + out["output"] - out["alias"] + out["temp"]
    out["params"] = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(model_state))
    return out
