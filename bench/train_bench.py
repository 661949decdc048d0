"""SFT train-step throughput of our jitted step vs the same-shape HF PyTorch model, in one run.

Same weights on both sides (a random Qwen2 of ~39M parameters made with transformers, converted
HF -> JAX (ours) and JAX -> HF (theirs), as in sampler_bench.py), fp32, the same batch. One step
on each side is: forward, masked next-token cross-entropy (prompt positions masked), backward,
global-norm clipping at 1.0, AdamW (weight decay 0.01) update.
  - ours:   `compile_step(graphdef, StepConfig(kind="sft"), tx, mesh, shardings)` on a 1-device
            mesh, A = 1 micro-batch, state donated;
  - theirs: eager PyTorch (no torch.compile), `Qwen2ForCausalLM(input_ids, attention_mask,
            labels=-100 on masked positions).loss.backward()`, `clip_grad_norm_(1.0)`,
            `torch.optim.AdamW(lr, weight_decay=0.01).step()`, `zero_grad()`.
Prints:
  - the losses of the first two steps on both sides (same weights, same batch, same update);
  - tokens/s (all b*T positions per step) each side and the ratio ours/theirs for --headline
    (default: the ModelConfig default, scan_layers=True, remat='none'), then every scan x remat
    variant (ours only); a third field sets StepConfig.logits_chunk (fused chunked LM-head
    loss), e.g. scan:dots:64;
  - model FLOP/s against this machine's matmul roofline (large jnp.dot, same run) and the
    formula for TPU MFU.

    .venv/bin/python bench/train_bench.py [--batch 8 --seq 256] [--profile] [--what_if linear2d]
        [--logits_chunk 64]

--profile adds a breakdown of one step on both sides (forward, forward+backward, the
cross-entropy over the vocabulary, clipping + AdamW alone). --what_if linear2d measures a
*proposed* library change, monkeypatched into this process only (metastone_jax is not edited):
`layers.Linear` as one 2-D matmul [rows, in] x [in, out] between reshapes; every number of that
run is then for the patched model and is labelled so.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import time

from common import best_time as _time
from common import matmul_roofline, qwen2_both_ways

os.environ.setdefault("JAX_PLATFORMS", "cpu")

# Peak bf16 matmul throughput per chip, from the public Cloud TPU documentation (system
# architecture pages for v5e, v5p and v6e / Trillium).
TPU_PEAK_BF16 = {"v5e": 197e12, "v5p": 459e12, "v6e": 918e12}
VARIANTS = ("scan:none", "scan:dots", "scan:full", "unroll:none", "unroll:dots", "unroll:full")


def _median_time(fn, n: int = 3) -> float:
    fn()
    return statistics.median(_time(fn) for _ in range(n))


def model_flops_per_step(n_matmul: int, layers: int, d_attn: int, seq: int, tokens: int) -> float:
    """tokens * (6 N + 12 L d_attn T): 6 N for forward + backward through the N matmul
    parameters, 12 L d_attn T for QK^T and PV (PaLM's MFU convention; no causal discount)."""
    return tokens * (6 * n_matmul + 12 * layers * d_attn * seq)


def what_if_linear2d() -> None:
    """Proposed change to metastone_jax/layers.py, applied to this process only: Linear.__call__
    flattens x to [rows, prod(in_shape)] and the kernel to [prod(in_shape), prod(out_shape)],
    does one jnp.dot, and reshapes back (row-major reshapes are free). Same values; XLA:CPU then
    emits the weight-gradient dots without materialising transposed [d_ff, rows] copies."""
    import math

    import jax.numpy as jnp

    from metastone_jax import layers

    def call(self, x):
        kernel = self.kernel[...].astype(self.compute_dtype)
        n_in = math.prod(kernel.shape[: self.n_in])
        out_shape = kernel.shape[self.n_in :]
        lead = x.shape[: x.ndim - self.n_in]
        y = jnp.dot(x.astype(self.compute_dtype).reshape(-1, n_in), kernel.reshape(n_in, -1))
        if self.bias is not None:
            y = y + self.bias[...].astype(self.compute_dtype).reshape(-1)
        return y.reshape(*lead, *out_shape)

    layers.Linear.__call__ = call


WHAT_IF = {"linear2d": what_if_linear2d}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--prompt", type=int, default=64, help="masked (prompt) positions per row")
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=16000)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--steps", type=int, default=4, help="timed steps per round and side")
    parser.add_argument("--rounds", type=int, default=2, help="alternating ours/theirs rounds")
    parser.add_argument("--variant_steps", type=int, default=3, help="timed steps per variant")
    parser.add_argument(
        "--variants", default=",".join(VARIANTS),
        help="scan|unroll:remat[:logits_chunk], ... (logits_chunk default: --logits_chunk)",
    )  # fmt: skip
    parser.add_argument(
        "--headline", default="scan:none",
        help="ours in the alternating rounds against theirs: scan|unroll:remat[:logits_chunk]",
    )  # fmt: skip
    parser.add_argument("--profile", action="store_true")
    parser.add_argument(
        "--logits_chunk", type=int, default=0,
        help="ours: StepConfig.logits_chunk (the fused chunked LM-head loss; 0 = full logits)",
    )  # fmt: skip
    parser.add_argument("--what_if", default="", help=f"comma list of {sorted(WHAT_IF)}")
    args = parser.parse_args()
    what_if = [w for w in args.what_if.split(",") if w]
    for name in what_if:
        WHAT_IF[name]()

    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch
    import transformers
    from flax import nnx

    from metastone_jax.checkpoint import load_params_checkpoint
    from metastone_jax.sharding import make_mesh
    from metastone_jax.train.state import (
        OptimConfig,
        init_train_state,
        make_optimizer,
        pure_params,
        state_shardings,
    )
    from metastone_jax.train.step import StepConfig, compile_step

    threads = os.cpu_count()
    torch.set_num_threads(threads)
    # Same weights both ways: HF -> JAX for ours, JAX -> HF for transformers.
    tmp, _, _ = qwen2_both_ways(
        vocab=args.vocab, hidden=args.hidden, layers=args.layers, prefix="train-bench-"
    )
    ckpt = os.path.join(tmp, "ckpt")

    # --- the batch: random tokens, every position valid, the first `prompt` positions masked --
    b, t = args.batch, args.seq
    tokens_np = np.random.default_rng(0).integers(10, args.vocab, (b, t)).astype(np.int32)
    loss_mask_np = np.broadcast_to(np.arange(t) >= args.prompt, (b, t))
    batch = {  # [A=1, b, T]
        "tokens": jnp.asarray(tokens_np[None]),
        "valid": jnp.ones((1, b, t), bool),
        "loss_mask": jnp.asarray(loss_mask_np[None]),
    }
    n_tokens = b * t  # positions run through forward + backward per step

    # --- ours ---------------------------------------------------------------------------------
    mesh = make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])
    tx = make_optimizer(OptimConfig(lr=args.lr, train_sprm=False))

    def parse(name: str) -> tuple[bool, str, int]:
        scan, remat, *chunk = name.split(":")
        return scan == "scan", remat, int(chunk[0]) if chunk else args.logits_chunk

    def build(scan: bool, remat: str, chunk: int):
        """(graphdef, compiled step, fresh train state) from the converted checkpoint."""
        model, _ = load_params_checkpoint(
            ckpt, mesh=mesh, compute_dtype="float32", scan_layers=scan, remat=remat
        )
        graphdef, params = nnx.graphdef(model), pure_params(model)
        param_shardings = jax.tree.map(lambda x: x.sharding, params)

        def init(p):
            return init_train_state(p, tx, seed=0, with_ref=False)

        shardings = state_shardings(jax.eval_shape(init, params), param_shardings, mesh)
        state = jax.jit(init, out_shardings=shardings)(params)
        step_cfg = StepConfig(kind="sft", logits_chunk=chunk)
        return graphdef, compile_step(graphdef, step_cfg, tx, mesh, shardings), state

    class Ours:
        def __init__(self, scan: bool, remat: str, chunk: int):
            self.graphdef, self.step, self.state = build(scan, remat, chunk)
            self.losses = []

        def __call__(self):
            self.state, metrics = self.step(self.state, batch)
            jax.block_until_ready((self.state, metrics))
            self.losses.append(float(metrics["loss"]))

    # --- theirs -------------------------------------------------------------------------------
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(
        os.path.join(tmp, "back"), dtype=torch.float32
    ).train()
    input_ids = torch.from_numpy(tokens_np.astype(np.int64))
    attention_mask = torch.ones_like(input_ids)
    labels = input_ids.masked_fill(~torch.from_numpy(loss_mask_np.copy()), -100)
    opt = torch.optim.AdamW(hf_model.parameters(), lr=args.lr, weight_decay=0.01)
    hf_params = [p for p in hf_model.parameters() if p.requires_grad]
    hf_losses = []

    def theirs():
        loss = hf_model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(hf_params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        hf_losses.append(loss.item())

    # --- two warm-up steps each (compile; loss check), then alternating rounds of N steps -----
    headline = parse(args.headline)
    default = Ours(*headline)
    t0 = time.perf_counter()
    default()
    t_compile = time.perf_counter() - t0
    theirs()
    default()
    theirs()
    ours_times, their_times = [], []
    for _ in range(args.rounds):
        ours_times += [_time(default) for _ in range(args.steps)]
        their_times += [_time(theirs) for _ in range(args.steps)]
    t_ours = statistics.median(ours_times)
    t_hf = statistics.median(their_times)
    losses = default.losses[:2]
    default.state = None  # free ours before building the variants

    # --- scan x remat variants (ours only; the headline's numbers are reused) ----------------
    variant_rows = []
    for name in [v for v in args.variants.split(",") if v]:
        if parse(name) == headline:
            variant_rows.append((name, t_compile, t_ours))
            continue
        v = Ours(*parse(name))
        t0 = time.perf_counter()
        v()
        t_c = time.perf_counter() - t0
        v()
        variant_rows.append(
            (name, t_c, statistics.median(_time(v) for _ in range(args.variant_steps)))
        )
        v.state = None

    peak_2048 = matmul_roofline(2048)
    peak_4096 = matmul_roofline(4096, repeat=3)
    peak = max(peak_2048, peak_4096)

    n_params = sum(p.numel() for p in hf_model.parameters())
    n_matmul = n_params - args.vocab * args.hidden  # the input embedding is a lookup, no matmul
    hf_cfg = hf_model.config
    d_attn = hf_cfg.num_attention_heads * (args.hidden // hf_cfg.num_attention_heads)
    flops = model_flops_per_step(n_matmul, args.layers, d_attn, t, n_tokens)

    chunk = headline[2]
    loss_kind = f"fused LM-head loss, chunks of {chunk}" if chunk else "full logits"
    label = f" [WHAT-IF: {'+'.join(what_if)} monkeypatched]" if what_if else ""
    print(f"model{label}: Qwen2 d={args.hidden} L={args.layers} V={args.vocab} "
          f"ff={hf_cfg.intermediate_size} heads={hf_cfg.num_attention_heads}/"
          f"{hf_cfg.num_key_value_heads}, {n_params / 1e6:.1f}M params ({n_matmul / 1e6:.1f}M in "
          f"matmuls), fp32; batch {b} x {t} = {n_tokens} tokens ({args.prompt} prompt positions "
          f"masked per row); jax {jax.__version__}, torch {torch.__version__} eager (no "
          f"torch.compile, attn {hf_model.config._attn_implementation}), transformers "
          f"{transformers.__version__}; {threads} CPU threads each side "
          f"(torch.set_num_threads({threads}); XLA:CPU's pool = cores); ours ({args.headline}):"
          f" {loss_kind}")  # fmt: skip
    rel = [abs(a - c) / abs(c) for a, c in zip(losses, hf_losses[:2], strict=True)]
    print(f"  loss step 1: ours {losses[0]:.6f}  theirs {hf_losses[0]:.6f}  rel diff "
          f"{rel[0]:.1e}; step 2: ours {losses[1]:.6f}  theirs {hf_losses[1]:.6f}  rel diff "
          f"{rel[1]:.1e}")  # fmt: skip
    print(f"  ours ({args.headline:15s})  {n_tokens / t_ours:8.1f} tok/s  ({t_ours:.3f} s/step, "
          f"median of {len(ours_times)}; min {min(ours_times):.3f})")  # fmt: skip
    print(f"  HF PyTorch eager         {n_tokens / t_hf:8.1f} tok/s  ({t_hf:.3f} s/step, "
          f"median of {len(their_times)}; min {min(their_times):.3f})")  # fmt: skip
    print(f"  ratio ours / theirs: {t_hf / t_ours:.2f}x")
    print(f"  matmul roofline (same run): 2048^2 jnp.dot {peak_2048 / 1e9:.1f} GFLOP/s, 4096^2 "
          f"{peak_4096 / 1e9:.1f} GFLOP/s; roof = the larger, {peak / 1e9:.1f}")  # fmt: skip
    print(f"  model FLOPs/step = tokens * (6 N + 12 L d_attn T) = {n_tokens} * (6 * {n_matmul} + "
          f"12 * {args.layers} * {d_attn} * {t}) = {flops / 1e9:.1f} GFLOP")  # fmt: skip
    for who, s in (("ours", t_ours), ("theirs", t_hf)):
        print(f"  {who:6s}: {flops / s / 1e9:6.1f} GFLOP/s = {100 * flops / s / peak:.0f}% of roof")
    print("  variants (ours)   compile+1st step   s/step (median)    tok/s   x theirs   of roof")
    best = min(variant_rows, key=lambda r: r[2])
    for name, t_c, s in variant_rows:
        mark = "  <- best" if name == best[0] else ""
        print(f"    {name:12s} {t_c:14.1f} s {s:16.3f} {n_tokens / s:12.1f} {t_hf / s:8.2f}x"
              f" {100 * flops / s / peak:8.0f}%{mark}")  # fmt: skip
    print("  TPU MFU = (model FLOPs per step / step time) / (chips * peak bf16 FLOP/s per chip); "
          "peak per chip (Cloud TPU docs): "
          + ", ".join(f"{k} {v / 1e12:.0f} TFLOP/s" for k, v in TPU_PEAK_BF16.items()))  # fmt: skip

    if args.profile:
        theirs_parts = profile_theirs(args, hf_model, opt, hf_params, input_ids, attention_mask,
                                      labels)  # fmt: skip
        ours_parts = {}
        for name in dict.fromkeys((args.headline, best[0])):
            step_cfg = StepConfig(kind="sft", logits_chunk=parse(name)[2])
            ours_parts[name] = profile_ours(build(*parse(name)), batch, tx, step_cfg)
        print("  profile (s per call, median of 3 after a warm-up call):")
        header = "".join(f"{'ours ' + n:>18s}" for n in ours_parts) + f"{'theirs':>12s}"
        print(f"    {'':28s}{header}")
        for part, t_theirs in theirs_parts.items():
            cols = "".join(f"{p[part]:18.3f}" for p in ours_parts.values())
            print(f"    {part:28s}{cols}{t_theirs:12.3f}")
    shutil.rmtree(tmp, ignore_errors=True)


def profile_ours(built, batch, tx, step_cfg) -> dict[str, float]:
    """The parts of our step, each jitted on its own: forward + loss, forward + backward, the
    cross-entropy over the vocabulary (on fixed logits), clipping + AdamW (on fixed grads)."""
    from functools import partial

    import jax
    import optax

    from metastone_jax import rl
    from metastone_jax.train import step as step_mod

    graphdef, _, state = built
    params = state.params
    mb = {k: v[0] for k, v in batch.items()}
    loss_fn = partial(step_mod.LOSSES[step_cfg.kind], graphdef=graphdef, cfg=step_cfg)
    fwd = jax.jit(lambda p: loss_fn(p, mb, None)[0])
    fwd_bwd = jax.jit(jax.value_and_grad(lambda p: loss_fn(p, mb, None)[0]))
    grads = fwd_bwd(params)[1]
    logits = jax.jit(
        lambda p: step_mod._model(graphdef, p)(mb["tokens"], valid=mb["valid"]).logits
    )(params)

    @jax.jit
    def ce(lg):
        def f(lg):
            logp = rl.token_logprobs(lg[:, :-1], mb["tokens"][:, 1:])
            return -rl.masked_mean(logp, mb["loss_mask"][:, 1:] & mb["valid"][:, 1:])

        return jax.value_and_grad(f)(lg)

    @jax.jit
    def update(g, opt_state, p):
        u, o = tx.update(g, opt_state, p)
        return optax.apply_updates(p, u), o

    def ready(fn, *a):
        return lambda: jax.block_until_ready(fn(*a))

    return {
        "forward + loss": _median_time(ready(fwd, params)),
        "forward + backward": _median_time(ready(fwd_bwd, params)),
        "CE over vocab (fwd+bwd)": _median_time(ready(ce, logits)),
        "clip + AdamW update": _median_time(ready(update, grads, state.opt_state, params)),
    }


def profile_theirs(args, hf_model, opt, hf_params, input_ids, attention_mask, labels):
    import torch

    def fwd():
        with torch.no_grad():
            hf_model(input_ids=input_ids, attention_mask=attention_mask, labels=labels)

    def fwd_bwd():
        hf_model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss.backward()
        opt.zero_grad(set_to_none=True)

    # Real gradients in place for the update (the update itself is timed repeatedly on them).
    hf_model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss.backward()

    def update():
        torch.nn.utils.clip_grad_norm_(hf_params, 1.0)
        opt.step()

    t_update = _median_time(update)
    opt.zero_grad(set_to_none=True)
    logits = torch.randn(args.batch, args.seq, args.vocab, requires_grad=True)

    def ce():
        torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, args.vocab), labels[:, 1:].reshape(-1), ignore_index=-100
        ).backward()
        logits.grad = None

    return {
        "forward + loss": _median_time(fwd),
        "forward + backward": _median_time(fwd_bwd),
        "CE over vocab (fwd+bwd)": _median_time(ce),
        "clip + AdamW update": t_update,
    }


if __name__ == "__main__":
    main()
