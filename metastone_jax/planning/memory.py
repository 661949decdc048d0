"""Per-device memory of a training run on a mesh: the accounting, every formula stated here.

Notation: L layers, D d_model, H heads, K kv heads, hd head_dim, F d_ff, V vocab; mesh sizes
dp = data*fsdp (rows are laid over both) and tp = tensor; c = bytes of the compute dtype (2 for
bf16). A mesh axis that does not divide a dimension leaves it replicated, as the rules table
does for activations (sharding.py): hq = H*hd/tp, hkv = K*hd/tp (K*hd when tp does not divide
K), f = F/tp, v = V/tp.

Exact (from the abstract train state, no allocation; train/state_bytes.py):
  params          every parameter's largest shard on one device, in its own dtype (param_dtype;
                  the SPRM head fp32), with the shardings the run uses (embed over fsdp;
                  heads/kv_heads/mlp/vocab over tensor).
  reference       GRPO with kl_coef > 0 keeps a frozen copy of the params, sharded like them.
  optimizer       optax state of the run's optimizer, each leaf sharded like the parameter it
                  mirrors: AdamW mu + nu, which take the parameter's dtype (optax's default,
                  mu_dtype=None): 2 x param bytes for each trained part. A frozen backbone
                  (set_to_zero) has none; the SPRM head has none when it is not trained (SFT).
  gradients       one param-shaped tree in the param dtype (the accumulator of the step's scan);
                  with grad_accum A > 1 one micro-batch's gradients exist next to it: x2.

Estimated (train step, one micro-batch of b = ceil(rows / dp) rows of T tokens per device;
the attention as model.attention sets it, "auto" planned as on a TPU (splash). Dense: s_eff =
keys per query, (T + 64) / 2 with the causal 64-query blocks of layers.py when 64 | T, else T;
scores = H/tp * s_eff elements per token and layer. Flash and splash: scores = 0, their scores
live per block; with packing (data.pack_tokens) T is the packed row and b the packed rows):
  s_none, bytes per token of one layer's intermediates:
      s_none = c*(3D + 3hq + 3hkv + 4f) + 4*(2D + hq + hkv) + (8 + c)*scores
    (in c: attention-norm out, mid residual, MLP-norm out; q and k projections and their rotary
    outputs, v, attention output; gate, up, silu(gate), their product. In fp32: the two norms'
    upcasts, the rotary upcasts of q and k, the scores and the softmax output; the
    probabilities in c.)
  s_policy, bytes per token each layer keeps for the backward pass under model.remat:
    none           s_none
    dots           c*(2D + 2hq + 2hkv + 2f) + 4*scores   (every matmul output: q, k, v, the
                   fp32 scores, attention output, o_proj, gate, up, down); with flash or
                   splash c*2f (XLA keeps gate and up and recomputes the rest)
    dots_no_batch  c*(2D + hq + 2hkv + 2f)   (the attention einsums have batch dims: not kept);
                   with flash or splash the same as dots (one compiled program)
    full           0
  activations  = b*T*(L*(2*c*D/sp + s_policy) + 2*c*D + 4*D)   (+ the scan carry (h, features)
                 each layer saves, sharded along the sequence over sp = tp when tp divides T
                 (sharding.py 'activation_length': Megatron-style sequence parallelism), +
                 embedding and final norm outside the blocks)
  SPR head     = b*T*2D*5   (grpo with the SPR loss, spr: the head's fp32 hidden [b, T, 2D] over
                 every position and its dropout mask, kept for its backward)
  layer work   = b*T*s_none + flash block   (the layer being differentiated: recomputed
                 intermediates or cotangents; flash block = b*(H/tp)*B^2*4*2, two f32 blocks
                 of B = min(512, T) queries x keys; splash keeps its blocks in VMEM: 0)
  logits       = b*T*v*(c + 4*n): the LM head output in c and n fp32 [b, T, V/tp] arrays
                 (logits, log-softmax pieces, cotangent): sft n = 3; grpo n = 6 (temperature,
                 entropy's softmax, more pieces); an SPR-only step never reads the logits (XLA
                 drops them: 0).
  chunked logits (train.logits_chunk = C > 0, metastone_jax/lm_loss.py): the head runs on C
                 positions at a time, in fp32: b*min(T, C)*v*4*m + 4*(D/fsdp)*v (the head's
                 fp32 gradient accumulator); sft m = 3 (the fused loss), grpo m = 4
                 (rematerialised chunks). Calibrated on CPU (tiny model, V 32768, T 256, C 16
                 to 64: the slope of XLA's temp bytes in C is exactly 3 and 4 chunk copies).
  The logits are freed before the layers' backward starts, so the step holds
      gradients + activations + SPR head + max(layer work, logits).
  Calibration: compiled steps of a 4-layer d=512 model on 8 CPU devices (T 512 to 2048, every
  remat policy, sft and grpo, tensor 1 and 2, grad_accum 1 and 2; XLA's memory_analysis) came
  within -9%/+20% of these formulas with fp32 compute and -20%/+12% with bf16 (the CPU upcasts
  bf16 logits); the coefficients (8 + c per score, n = 3 / 6) were read off those runs. Flash
  attention (2- and 8-layer d=256 models on 8 CPU devices, T 1024 to 4096, every remat policy,
  sft and grpo with packed rows, tensor 1 and 2, LM head in chunks of 256): the per-token
  slopes within 3% (none, full) and 2% (dots) of XLA's, the totals within -9%/+7%
  (tests/test_plan.py); the flash block's 2 copies and the dots terms were read off those
  runs. A TPU compiles differently (and splash is not measured here): treat the estimate as
  +-25%.

Estimated (rollouts, GRPO / SPR sampling, on the engine of sample/engine.py: S slots decode
together over a pool of pages). One engine runs over the whole mesh (`engine._constrain`): its
slot arrays laid over data*fsdp as far as S divides them (s = S/dp rows per device, else S), its
pages whole on every device (a slot reads any page), kv heads over tensor (K/tp below: K when
tp does not divide K). N = prompts * k rollouts per step; P is the padded prompt width, G the
max new tokens, W = ceil((P + G) / page) the page table's width. rl.slots, rl.pages,
rl.page_size and rl.memory_fraction set S and the pool; 0 lets the planner choose (below). Per
device:
  page pool       pages * 2 * L * (K/tp) * hd' * page * c   (k and v of every layer; hd' = hd
                  in the "xla" layout, k [pages, K, hd, page] and v [pages, K, page, hd]; hd
                  rounded up to 128 in the "pallas" layout [pages, page, 2K, hd'] of the TPU
                  kernel, attention/paged_tpu.py: the layout planned, the TPU's, unless the kernel
                  cannot serve K/tp heads of the compute dtype, then "xla")
  slot state      s * (5V + c*D + 4G + 8*Smax + 4W + 86) + 4*pages + 4   (a DecodeState row per
                  slot: next logits fp32 and seen bool [V], next feature [D], tokens int32 [G],
                  step scores fp32 and step indices int32 [Smax = (G + 1) // 2], the page-table
                  row [W], 86 bytes of [S] scalars; the free-page list and the clock. Not
                  sharded: the sampler draws over the whole vocabulary)
  question table  2S * (5V + c*D + 24)   (the start fields of resident prompts: next logits,
                  seen, feature and 6 int32 counters; not laid over the mesh)
  decode weights  (params/p * fsdp + V/tp * D) * c   (p = param bytes): XLA gathers the weights
                  a loop reads once, before it (the all-gather is loop-invariant), so the
                  segment and the prefill hold one tensor shard of every weight whole, plus a
                  copy of the embedding/LM head. Counted in the compute dtype, the dtype the
                  matmuls read (a TPU runs them in bf16: not measured here). Measured on XLA:CPU
                  with fp32 compute over fsdp: the static decode loop's temp was within 1% of
                  this; with bf16 compute XLA:CPU gathers fp32 (its dots run in fp32), twice
                  this. On one CPU device nothing is gathered: the engine's CPU path copies each
                  layer's slice of the stacked weights instead (the L blocks' params, in p).
  segment work    s * V * (4*m + 1) + attention   (the decode segment's temporaries: m fp32
                  [s, V] arrays, 2 (the LM head's logits, the new next logits) or 6 with top_p
                  < 1 (sample/draw.py's nucleus draw), and the new seen mask; attention, one
                  page column of one layer at a time: xla s*(K/tp)*(hd*page*(4 + c) +
                  8*Gq*page) (keys gathered in fp32, values in c, scores and exponentials; Gq =
                  H/K); pallas 8*s*(H/tp)*hd' (q padded to the lanes, the output; the kernel's
                  blocks live in VMEM); xla, when every candidate has a slot from the start,
                  also its dense working set (attention/segment_kv.py):
                  2*L*(K/tp)*hd*c * (s*T + B*ceil(P/page)*page), the segment's T tokens in
                  chunks (T = the default segment's min(128, G) steps rounded up to chunks of
                  min(64, T) tokens), and for each of B = ceil(2S/R) blocks of R = min(k, 8)
                  rows (rounded down to a power of two; none when 1) a copy of its prompt)
  prefill work    r*P*((4 + c)*scores + c*f) + 2*L*r*(K/tp)*P*hd*c + r*V*(5 + c)   (r of the
                  prompts prefilled together on one device, laid over data*fsdp as the slots:
                  the first fill's ceil(S/k), at most the prompts, padded to a power of 2 as
                  the engine pads; one layer's scores and
                  probabilities (scores = H/tp * s_eff, as in the step) and MLP hidden, every
                  layer's keys and values before they are paged, the last position's logits and
                  seen mask. A preempted candidate's resumption prefills P + its tokens in one
                  row: not counted, reported with the simulated preemptions)
  The rollout phase holds pool + slot state + question table + decode weights
  + max(segment work, prefill work): a segment and a prefill never run at once.
Choosing (rl.slots = 0, rl.pages = 0; planning/engine_memory.py `plan_engine`):
  pages   the pages that fit POOL_FRACTION = 90% of HBM after the resident state and the rest
          of the rollout phase, at most the engine's own default (every slot's whole budget:
          S*(W + 1) + min(S, prompts)*ceil(P/page)), at least W + 1 (one whole sequence, the
          engine's floor). The pool is whole on every device: it holds the pages of all S
          slots of the mesh, not of a device's share. rl.memory_fraction = f > 0: min(default,
          f * (HBM - resident) / (2*L*K*hd'*page*c)), the engine's rule (`pages_for_memory`:
          the memory free when it starts over a page of all kv heads, hd' = hd in the xla
          layout, hd rounded up to 128 in the pallas one).
  slots   the most, up to min(n, 256), whose candidates, all started together (as the first
          fill starts them), fit the pool with their prompts' pages when one runs to the budget
          and the others stop at the mean response length E[L]: ceil(S/k)*ceil(P/page) +
          (S - 1)*own(E[L]) + own(G) <= pages, own(x) = ceil((P + x)/page) - floor(P/page) (a
          candidate's own pages: it shares its prompt's full pages), rounded down to a multiple
          of data*fsdp when at least that (so that the slots shard); the pool is then sized
          again for those S (and S raised once if the smaller slot terms leave room).
  occupancy  tokens / (S x decode steps) from a simulation of the engine's schedule
          (planning/occupancy.py): response lengths lognormal with median G/4 and sigma 0.7,
          capped at G (the issue's reference distribution), a slot refilled as soon as it
          frees while the pool has pages for the tokens alive, the newest candidate preempted
          when it has none; 8 draws averaged; prefill time not counted. The pool lives only
          while the engine runs (a generate call), so it never meets the train step.
  Calibration: `engine.segment` compiled on one CPU device (fp32 compute; three tiny models, S
  16-64, page 8-32, G 256-2048, V 1024-16384, top_p 1 and 0.95; bench/engine_memory.py) came
  within 1% of params + the per-layer weight copies + pool + slot state + segment work (XLA's
  arguments + temporaries, the donated state aliased; its temporaries alone within 6%): m = 2 /
  6 and the attention terms were read off those runs. The compiled prefill's temporaries came
  within -14%/+5% of the prefill formula (CPU fp32, 2-8 prompts of 256-1024 tokens; the pool
  is updated in place, donated), whose (4 + c) per score was read off them. The pallas layout
  and TPU compilation are not measured here.

Peak per device = resident (params + reference + optimizer) + max(train step, rollout phase):
rollouts and updates never run at the same time.
Activations, layer work, logits and the engine's work are estimates of what XLA keeps (its
fusion and rematerialisation choices move them); state bytes are exact. Not modelled: the
rollout log-prob pass (a forward without gradients: smaller than the step), XLA scratch, and
host-side data.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from metastone_jax.config import ModelConfig
from metastone_jax.planning.tpu import GIB, TpuType

CAUSAL_BLOCK = 64  # layers.CAUSAL_BLOCK: queries per block of the causal attention
FLASH_BLOCK = 512  # attention.flash.DEFAULT_BLOCK: queries and keys per block
FLASH_BLOCK_COPIES = 2  # f32 [rows, H/tp, bq, bk] arrays a flash block pass holds (calibrated)
LOGIT_COPIES = {"sft": 3, "grpo": 6, "spr": 0}
CHUNK_COPIES = {"sft": 3, "grpo": 4, "spr": 0}
WARN_FRACTION = 0.9


@dataclasses.dataclass(frozen=True)
class Workload:
    """What the run does. train_rows: rows of one micro-batch on the whole mesh; `candidates`
    rollouts per step from `prompts` prompts (k each; 0: no sampling); prompt_len P (padded),
    max_new G; cache_len: the longest sequence (default P + G). The engine: slots, pages (0:
    the planner chooses), page_size, memory_fraction (rl.*); top_p of the rollouts' sampling."""

    kind: str
    train_rows: int
    seq_len: int
    grad_accum: int = 1
    prompts: int = 0
    candidates: int = 0
    k: int = 1
    prompt_len: int = 0
    max_new: int = 0
    cache_len: int = 0
    logits_chunk: int = 0  # train.logits_chunk: LM-head positions per chunk (0 = full logits)
    pack_tokens: int = 0  # data.pack_tokens: rows are packed to seq_len = this many tokens
    unpacked_rows: int = 0  # with packing: the micro-batch's sequences (train_rows: packed rows)
    spr: bool = False  # the step runs the SPR loss (its head on every position)
    slots: int = 0
    pages: int = 0
    page_size: int = 64
    memory_fraction: float = 0.0
    top_p: float = 1.0

    @property
    def kv_len(self) -> int:
        return self.cache_len or self.prompt_len + self.max_new


@dataclasses.dataclass(frozen=True)
class StateBytes:
    """Exact per-device bytes of the train state's parts (train/state_bytes.py)."""

    params: int
    sprm_params: int
    reference: int
    optimizer: int
    param_dtype: str


@dataclasses.dataclass(frozen=True)
class Component:
    name: str
    phase: str  # resident | step | rollout; "step*" / "rollout*": only the larger of these counts
    bytes: int
    detail: str = ""


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
    model: str
    tpu: TpuType
    mesh_shape: dict
    workload: Workload
    remat: str
    components: tuple[Component, ...]
    activations_by_remat: dict  # policy -> activations + layer work (alternatives, not summed)
    rows_per_device: int
    rollout_rows_per_device: int  # the engine's slots on one device
    engine: object | None = None  # engine_memory.EnginePlan: slots, pages, occupancy

    def alternatives(self, phase: str) -> list[Component]:
        """The components of which only the largest counts ("step*", "rollout*")."""
        return [c for c in self.components if c.phase == phase + "*"]

    def _peak(self, phase: str) -> int:
        alts = self.alternatives(phase)
        return self.resident + self.phase_bytes(phase) + max((c.bytes for c in alts), default=0)

    def phase_bytes(self, phase: str) -> int:
        return sum(c.bytes for c in self.components if c.phase == phase)

    @property
    def resident(self) -> int:
        return self.phase_bytes("resident")

    @property
    def step_peak(self) -> int:
        return self._peak("step")

    @property
    def rollout_peak(self) -> int:
        return self._peak("rollout") if self.rollout_rows_per_device else self.resident

    @property
    def total(self) -> int:
        return max(self.step_peak, self.rollout_peak)

    @property
    def hbm(self) -> int:
        return self.tpu.hbm_bytes

    @property
    def fits(self) -> bool:
        return self.total <= self.hbm

    @property
    def shortfall(self) -> int:
        return max(0, self.total - self.hbm)

    @property
    def peak_components(self) -> list[Component]:
        """The components that make up the total: resident + the larger phase (of its starred
        alternatives, the larger one)."""
        phase = "step" if self.step_peak >= self.rollout_peak else "rollout"
        return self.phase_components(phase)

    def phase_components(self, phase: str) -> list[Component]:
        """resident + `phase`'s components + the larger of its alternatives."""
        alts = self.alternatives(phase)
        extra = [max(alts, key=lambda c: c.bytes)] if alts else []
        return [c for c in self.components if c.phase in ("resident", phase)] + extra

    @property
    def biggest(self) -> Component:
        return max(self.peak_components, key=lambda c: c.bytes)

    @property
    def tight(self) -> bool:
        return self.fits and self.total > WARN_FRACTION * self.hbm

    def component(self, name: str) -> Component:
        for c in self.components:
            if c.name == name:
                return c
        raise KeyError(name)


def _split(n: int, ways: int) -> int:
    """A dimension of n over `ways` devices: n / ways when it divides, else replicated (n)."""
    return n // ways if n % ways == 0 else n


def causal_keys_per_query(t: int) -> float:
    """Average keys each query's scores span in a train forward of t tokens (no cache)."""
    if t > CAUSAL_BLOCK and t % CAUSAL_BLOCK == 0:
        return (t + CAUSAL_BLOCK) / 2
    return float(t)


def planned_attention(cfg: ModelConfig) -> str:
    """The attention a plan assumes: the setting's, with "auto" as on a TPU (splash)."""
    return "splash" if cfg.attention == "auto" else cfg.attention


def layer_bytes_per_token(cfg: ModelConfig, tp: int, t: int) -> dict[str, float]:
    """Bytes kept per token and layer for the backward pass under each remat policy."""
    c = cfg.compute_jnp_dtype.itemsize
    d = cfg.d_model
    hq = _split(cfg.n_heads, tp) * cfg.head_dim
    hkv = _split(cfg.n_kv_heads, tp) * cfg.head_dim
    f = _split(cfg.d_ff, tp)
    dense = planned_attention(cfg) == "dense"
    # flash and splash: scores live per block (flash_block_bytes), never per token
    scores = _split(cfg.n_heads, tp) * causal_keys_per_query(t) if dense else 0.0
    none = c * (3 * d + 3 * hq + 3 * hkv + 4 * f) + 4 * (2 * d + hq + hkv) + (8 + c) * scores
    # dots with flash: XLA keeps the MLP's gate and up outputs and recomputes the rest, and
    # compiles dots_no_batch to the same program (measured: equal temporaries)
    dots = c * (2 * d + 2 * hq + 2 * hkv + 2 * f) + 4 * scores if dense else c * 2 * f
    return {
        "none": none,
        "dots": dots,
        "dots_no_batch": c * (2 * d + hq + 2 * hkv + 2 * f) if dense else dots,
        "full": 0.0,
    }


def sequence_shards(tp: int, t: int) -> int:
    """Ways the residual stream between blocks is split along the sequence (sharding.py's
    'activation_length' rule: over 'tensor' when it divides the length)."""
    return tp if t % tp == 0 else 1


def activation_bytes(cfg: ModelConfig, tp: int, rows: int, t: int, remat: str) -> int:
    """Estimated activations one micro-batch (rows per device x t tokens) keeps for the backward
    pass under `remat`; the blocks' saved inputs sharded along the sequence."""
    c = cfg.compute_jnp_dtype.itemsize
    d = cfg.d_model
    kept = layer_bytes_per_token(cfg, tp, t)[remat]
    carry = 2 * c * d / sequence_shards(tp, t)
    return int(rows * t * (cfg.n_layers * (carry + kept) + 2 * c * d + 4 * d))


def spr_head_bytes(cfg: ModelConfig, rows: int, t: int) -> int:
    """The SPR head's hidden layer over every position, kept for its backward: fp32
    [rows, t, 2D] and the dropout mask (1 byte each)."""
    return rows * t * 2 * cfg.d_model * 5


def flash_block_bytes(cfg: ModelConfig, tp: int, rows: int, t: int) -> int:
    """The XLA flash attention's block work: a few f32 [rows, H/tp, bq, bk] arrays (scores,
    probabilities, their cotangents) of the block being computed; splash keeps its blocks in
    the TPU's VMEM (0 here), dense has none (its scores are per token)."""
    if planned_attention(cfg) != "flash":
        return 0
    block = min(FLASH_BLOCK, -(-t // 8) * 8)
    return int(rows * _split(cfg.n_heads, tp) * block * block * 4 * FLASH_BLOCK_COPIES)


def layer_work_bytes(cfg: ModelConfig, tp: int, rows: int, t: int) -> int:
    """The layer being differentiated: one layer's intermediates (recomputed or cotangents)."""
    per_token = layer_bytes_per_token(cfg, tp, t)["none"]
    return int(rows * t * per_token) + flash_block_bytes(cfg, tp, rows, t)


def logits_bytes(
    cfg: ModelConfig, tp: int, rows: int, t: int, kind: str, chunk: int = 0, fsdp: int = 1
) -> int:
    """The LM head's output and loss pieces: whole [rows, t, V/tp] arrays, or with `chunk` > 0
    a chunk of them plus the head's fp32 gradient accumulator (module docstring)."""
    v = _split(cfg.vocab_size, tp)
    if LOGIT_COPIES[kind] == 0:
        return 0
    if chunk > 0:
        return rows * min(t, chunk) * v * 4 * CHUNK_COPIES[kind] + 4 * _split(cfg.d_model, fsdp) * v
    return rows * t * v * (cfg.compute_jnp_dtype.itemsize + 4 * LOGIT_COPIES[kind])


def _logits_note(cfg: ModelConfig, tp: int, rows: int, t: int, w: Workload) -> str:
    v = _split(cfg.vocab_size, tp)
    if w.logits_chunk > 0:
        c = min(t, w.logits_chunk)
        return f"chunks of [{rows}, {c}, {v}] fp32 x{CHUNK_COPIES[w.kind]} + head grad (fp32)"
    return f"[{rows}, {t}, {v}] fp32 x{LOGIT_COPIES[w.kind]} + LM head out"


def decode_weights_bytes(cfg: ModelConfig, state: StateBytes, mesh_shape: dict) -> int:
    """The weights the engine's compiled segment and prefill hold beyond the resident shards
    on a TPU mesh (see above)."""
    elements = state.params // jnp.dtype(cfg.param_dtype).itemsize * mesh_shape["fsdp"]
    elements += _split(cfg.vocab_size, mesh_shape["tensor"]) * cfg.d_model
    return elements * cfg.compute_jnp_dtype.itemsize


def gib(n: float) -> float:
    return n / GIB
