"""Per-device memory of a training run on a mesh: the accounting, every formula stated here.

Notation: L layers, D d_model, H heads, K kv heads, hd head_dim, F d_ff, V vocab; mesh sizes
dp = data*fsdp (rows are laid over both) and tp = tensor; c = bytes of the compute dtype (2 for
bf16). A mesh axis that does not divide a dimension leaves it replicated, as the rules table
does for activations (sharding.py): hq = H*hd/tp, hkv = K*hd/tp (K*hd when tp does not divide
K), f = F/tp, v = V/tp.

Exact (from the abstract train state, no allocation; planning/state_bytes.py):
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
s_eff = keys per query: (T + 64) / 2 with the causal 64-query blocks of layers.py when 64 | T,
else T; scores = H/tp * s_eff elements per token and layer):
  s_none, bytes per token of one layer's intermediates:
      s_none = c*(3D + 3hq + 3hkv + 4f) + 4*(2D + hq + hkv) + (8 + c)*scores
    (in c: attention-norm out, mid residual, MLP-norm out; q and k projections and their rotary
    outputs, v, attention output; gate, up, silu(gate), their product. In fp32: the two norms'
    upcasts, the rotary upcasts of q and k, the scores and the softmax output; the
    probabilities in c.)
  s_policy, bytes per token each layer keeps for the backward pass under model.remat:
    none           s_none
    dots           c*(2D + 2hq + 2hkv + 2f) + 4*scores   (every matmul output: q, k, v, the
                   fp32 scores, attention output, o_proj, gate, up, down)
    dots_no_batch  c*(2D + hq + 2hkv + 2f)   (the attention einsums have batch dims: not kept)
    full           0
  activations  = b*T*(L*(2*c*D + s_policy) + 2*c*D + 4*D)   (+ the scan carry (h, features)
                 each layer saves, + embedding and final norm outside the blocks)
  layer work   = b*T*s_none   (the layer being differentiated: recomputed intermediates or
                 cotangents)
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
      gradients + activations + max(layer work, logits).
  Calibration: compiled steps of a 4-layer d=512 model on 8 CPU devices (T 512 to 2048, every
  remat policy, sft and grpo, tensor 1 and 2, grad_accum 1 and 2; XLA's memory_analysis) came
  within -9%/+20% of these formulas with fp32 compute and -20%/+12% with bf16 (the CPU upcasts
  bf16 logits); the coefficients (8 + c per score, n = 3 / 6) were read off those runs. A TPU
  compiles differently: treat the estimate as +-25%.

Estimated (rollouts, GRPO / SPR sampling; N = prompts * k candidates, n = ceil(N / dp),
bp = ceil(prompts / dp), P = padded prompt width, G = max new tokens, capped at max_len - P;
the sampler prefills each prompt once and its k candidates share that cache as a prefix, while
each candidate's own cache holds only what it generates, grown as needed: GROW_SLOTS slots,
doubled up to G, sample/sampler.py):
  KV cache        2 * L * (K/tp) * hd * c * (n * G + pp * P)   (k and v per layer: the
                  candidates' own [n, K, G, hd], rows over dp; the prompts' prefix
                  [prompts, K, P, hd], pp = prompts per device: over data, then fsdp, as far
                  as the prompt count divides them, else replicated; kv heads over tp when tp
                  divides K)
  sampler work    max(prefill: bp*P*H/tp*P*(8 + c) + bp*v*(c + 4) (one layer's scores; the LM
                  head runs on the last prompt position only), decode: 2*(K/tp)*hd*4*(n*G +
                  pp*P) + 2*n*v*4 (one layer's K and V read in fp32, logits and
                  probabilities), growth: one layer's own cache before its last growth, alive
                  while its grown copy is made: the cache grows a layer at a time) + decode
                  state n*G*8 (tokens, step scores and their indices).
  decode weights  (params/p * fsdp + V/tp * D) * c   (p = param bytes): XLA gathers the weights
                  a loop reads once, before it (the all-gather is loop-invariant), so prefill
                  and decode hold one tensor shard of every weight whole, plus a copy of the
                  embedding/LM head. Counted in the compute dtype, the dtype the matmuls read
                  (a TPU runs them in bf16: not measured here). Measured on XLA:CPU with fp32
                  compute: the compiled decode loop's temp is within 1% of this; with bf16
                  compute XLA:CPU gathers fp32 (its dots run in fp32), twice this.

Peak per device = resident (params + reference + optimizer) + max(train step, rollouts (KV
cache + sampler work + decode weights)): rollouts and updates never run at the same time.
Activations, layer work, logits and the sampler's work are estimates of what XLA keeps (its
fusion and rematerialisation choices move them); state bytes are exact. Not modelled: the
rollout log-prob pass (a forward without gradients: smaller than the step), XLA scratch, and
host-side data.
"""

from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp

from metastone_jax.config import REMAT_POLICIES, ModelConfig
from metastone_jax.planning.tpu import GIB, TpuType
from metastone_jax.sharding import logical_to_spec

CAUSAL_BLOCK = 64  # layers.CAUSAL_BLOCK: queries per block of the causal attention
LOGIT_COPIES = {"sft": 3, "grpo": 6, "spr": 0}
CHUNK_COPIES = {"sft": 3, "grpo": 4, "spr": 0}
WARN_FRACTION = 0.9


@dataclasses.dataclass(frozen=True)
class Workload:
    """What the run does. train_rows: rows of one micro-batch on the whole mesh; `candidates`
    rows decoded at once from `prompts` prompts (k each; 0: no sampling); prompt_len P
    (padded), max_new G; cache_len S (default P + G)."""

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

    @property
    def slots(self) -> int:
        return self.cache_len or self.prompt_len + self.max_new


@dataclasses.dataclass(frozen=True)
class StateBytes:
    """Exact per-device bytes of the train state's parts (planning/state_bytes.py)."""

    params: int
    sprm_params: int
    reference: int
    optimizer: int
    param_dtype: str


@dataclasses.dataclass(frozen=True)
class Component:
    name: str
    phase: str  # resident | step | rollout; "step*": only the larger of these counts
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
    rollout_rows_per_device: int

    def phase_bytes(self, phase: str) -> int:
        return sum(c.bytes for c in self.components if c.phase == phase)

    @property
    def resident(self) -> int:
        return self.phase_bytes("resident")

    @property
    def step_peak(self) -> int:
        alternatives = [c.bytes for c in self.components if c.phase == "step*"]
        return self.resident + self.phase_bytes("step") + max(alternatives, default=0)

    @property
    def rollout_peak(self) -> int:
        return self.resident + self.phase_bytes("rollout")

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
        """The components that make up the total: resident + the larger phase (of the step*
        alternatives, the larger one)."""
        phase = "step" if self.step_peak >= self.rollout_peak else "rollout"
        alternatives = [c for c in self.components if c.phase == "step*"]
        extra = (
            [max(alternatives, key=lambda c: c.bytes)] if phase == "step" and alternatives else []
        )
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


def layer_bytes_per_token(cfg: ModelConfig, tp: int, t: int) -> dict[str, float]:
    """Bytes kept per token and layer for the backward pass under each remat policy."""
    c = cfg.compute_jnp_dtype.itemsize
    d = cfg.d_model
    hq = _split(cfg.n_heads, tp) * cfg.head_dim
    hkv = _split(cfg.n_kv_heads, tp) * cfg.head_dim
    f = _split(cfg.d_ff, tp)
    scores = _split(cfg.n_heads, tp) * causal_keys_per_query(t)
    none = c * (3 * d + 3 * hq + 3 * hkv + 4 * f) + 4 * (2 * d + hq + hkv) + (8 + c) * scores
    return {
        "none": none,
        "dots": c * (2 * d + 2 * hq + 2 * hkv + 2 * f) + 4 * scores,
        "dots_no_batch": c * (2 * d + hq + 2 * hkv + 2 * f),
        "full": 0.0,
    }


def activation_bytes(cfg: ModelConfig, tp: int, rows: int, t: int, remat: str) -> int:
    """Estimated activations one micro-batch (rows per device x t tokens) keeps for the backward
    pass under `remat`."""
    c = cfg.compute_jnp_dtype.itemsize
    d = cfg.d_model
    kept = layer_bytes_per_token(cfg, tp, t)[remat]
    return int(rows * t * (cfg.n_layers * (2 * c * d + kept) + 2 * c * d + 4 * d))


def layer_work_bytes(cfg: ModelConfig, tp: int, rows: int, t: int) -> int:
    """The layer being differentiated: one layer's intermediates (recomputed or cotangents)."""
    return int(rows * t * layer_bytes_per_token(cfg, tp, t)["none"])


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


def kv_cache_bytes(cfg: ModelConfig, tp: int, rows: int, slots: int) -> int:
    """k and v buffers [rows, K/tp, slots, hd] for each of the L layers, in the compute dtype."""
    c = cfg.compute_jnp_dtype.itemsize
    return 2 * cfg.n_layers * rows * _split(cfg.n_kv_heads, tp) * slots * cfg.head_dim * c


def own_slots(cfg: ModelConfig, w: Workload) -> int:
    """G: the slots of each candidate's own cache once grown to its budget."""
    return max(0, min(w.slots - w.prompt_len, cfg.max_len - w.prompt_len))


def cache_sizes(budget: int) -> list[int]:
    """The own cache's sizes as the sampler grows it: GROW_SLOTS, doubled, capped at budget."""
    from metastone_jax.sample.sampler import GROW_SLOTS

    sizes = [min(budget, GROW_SLOTS) if GROW_SLOTS else budget]
    while sizes[-1] < budget:
        sizes.append(min(budget, 2 * sizes[-1]))
    return sizes


def prompts_per_device(prompts: int, mesh_shape: dict) -> int:
    """The shared prefix's rows on one device: the sampler lays them over the 'batch' axes
    non-strictly (`sharding.logical_to_spec`), dropping an axis the count does not divide."""
    spec = logical_to_spec(("batch",), (prompts,), mesh_shape, strict=False)
    axes = spec[0] if spec else None
    axes = () if axes is None else (axes,) if isinstance(axes, str) else axes
    return prompts // math.prod(mesh_shape.get(a, 1) for a in axes)


def rollout_kv_bytes(cfg: ModelConfig, w: Workload, mesh_shape: dict) -> int:
    """The candidates' own caches (rows over dp) + the prompts' shared prefix."""
    tp, dp = mesh_shape["tensor"], mesh_shape["data"] * mesh_shape["fsdp"]
    n = math.ceil(w.candidates / dp)
    pp = prompts_per_device(w.prompts, mesh_shape)
    return kv_cache_bytes(cfg, tp, n, own_slots(cfg, w)) + kv_cache_bytes(cfg, tp, pp, w.prompt_len)


def sampler_work_bytes(cfg: ModelConfig, w: Workload, mesh_shape: dict) -> int:
    """The largest of prefill's temporaries, decode's, and the cache growth's old copy, plus
    the decode state."""
    tp, dp = mesh_shape["tensor"], mesh_shape["data"] * mesh_shape["fsdp"]
    n = math.ceil(w.candidates / dp)
    bp = math.ceil(w.prompts / dp)
    pp = prompts_per_device(w.prompts, mesh_shape)
    p, g = w.prompt_len, own_slots(cfg, w)
    c = cfg.compute_jnp_dtype.itemsize
    v = _split(cfg.vocab_size, tp)
    prefill = bp * p * _split(cfg.n_heads, tp) * p * (8 + c) + bp * v * (c + 4)
    decode = 2 * _split(cfg.n_kv_heads, tp) * cfg.head_dim * 4 * (n * g + pp * p)
    decode += 2 * n * v * 4
    sizes = cache_sizes(g)
    growth = kv_cache_bytes(cfg, tp, n, sizes[-2]) // cfg.n_layers if len(sizes) > 1 else 0
    state = n * w.max_new * 8
    return int(max(prefill, decode, growth) + state)


def decode_weights_bytes(cfg: ModelConfig, state: StateBytes, mesh_shape: dict) -> int:
    """The weights the sampler's compiled loops hold beyond the resident shards (see above)."""
    elements = state.params // jnp.dtype(cfg.param_dtype).itemsize * mesh_shape["fsdp"]
    elements += _split(cfg.vocab_size, mesh_shape["tensor"]) * cfg.d_model
    return elements * cfg.compute_jnp_dtype.itemsize


def build_plan(
    cfg: ModelConfig,
    *,
    name: str,
    tpu: TpuType,
    mesh_shape: dict,
    workload: Workload,
    state: StateBytes,
) -> MemoryPlan:
    """Assembles the components (formulas in the module docstring)."""
    dp = mesh_shape["data"] * mesh_shape["fsdp"]
    tp = mesh_shape["tensor"]
    w = workload
    if w.train_rows % dp:
        raise ValueError(
            f"a micro-batch of {w.train_rows} rows cannot be laid over data*fsdp = {dp} "
            f"devices: make the rows per update / data.grad_accum a multiple of {dp}"
        )
    if w.candidates % dp:
        raise ValueError(
            f"{w.candidates} rollout candidates cannot be laid over data*fsdp = {dp} devices: "
            "change data.batch_size, rl.k or the mesh"
        )
    b = w.train_rows // dp
    t = w.seq_len
    work = layer_work_bytes(cfg, tp, b, t)
    grads = state.params * (2 if w.grad_accum > 1 else 1)
    pd = state.param_dtype
    comps = [
        Component(
            "params", "resident", state.params,
            f"{pd}; SPRM head fp32 ({state.sprm_params / 2**20:.1f} MiB)",
        ),
        Component("reference params", "resident", state.reference, "frozen copy for the KL"),
        Component("optimizer state", "resident", state.optimizer, f"AdamW mu + nu ({pd})"),
        Component(
            "gradients", "step", grads,
            pd + (": accumulator + one micro-batch's" if w.grad_accum > 1 else ""),
        ),
        Component(
            "activations", "step", activation_bytes(cfg, tp, b, t, cfg.remat),
            f"kept for backward, remat={cfg.remat}, {b} x {t} tokens",
        ),
        Component("layer work", "step*", work, "the layer being differentiated"),
        Component(
            "logits", "step*",
            logits_bytes(cfg, tp, b, t, w.kind, w.logits_chunk, mesh_shape["fsdp"]),
            _logits_note(cfg, tp, b, t, w),
        ),
    ]  # fmt: skip
    n = w.candidates // dp
    if n:
        comps += [
            Component(
                "KV cache", "rollout", rollout_kv_bytes(cfg, w, mesh_shape),
                f"{n} rows x {own_slots(cfg, w)} slots + "
                f"{prompts_per_device(w.prompts, mesh_shape)} shared prompts x {w.prompt_len}",
            ),
            Component("sampler work", "rollout", sampler_work_bytes(cfg, w, mesh_shape),
                      "prefill/decode temporaries or a layer's growth copy"),
            Component("decode weights", "rollout", decode_weights_bytes(cfg, state, mesh_shape),
                      f"the weights gathered over fsdp {mesh_shape['fsdp']} for the loops"),
        ]  # fmt: skip
    comps = [c for c in comps if c.bytes or c.name in ("params", "optimizer state")]
    return MemoryPlan(
        model=name,
        tpu=tpu,
        mesh_shape=dict(mesh_shape),
        workload=w,
        remat=cfg.remat,
        components=tuple(comps),
        activations_by_remat={p: activation_bytes(cfg, tp, b, t, p) + work for p in REMAT_POLICIES},
        rows_per_device=b,
        rollout_rows_per_device=n,
    )


def gib(n: float) -> float:
    return n / GIB
