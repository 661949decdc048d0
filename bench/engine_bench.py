"""The paged, continuously batched engine vs today's static sampler, in one run.

Same weights on both sides: a random Qwen2 of ~39M parameters (d=512, L=8, V=16000), made with
transformers and converted HF -> JAX (bench/common.py), fp32, no EOS. Two workloads:

  heavy-tailed: 8 prompts x k=32, max_new_tokens 512; each candidate stops at its own length,
    drawn lognormal (median max_new_tokens/4, sigma --sigma), capped at max_new_tokens (per-
    candidate `limits`, the same on both sides). The static sampler decodes all 256 rows until
    the longest ends; the engine runs --slots slots over a pool of the SAME KV bytes as the
    static cache (prompts once + 256 rows x max_new_tokens; less the KV bytes of the segment's
    dense working set, attention/segment_kv.py), refilling slots as candidates end.
    Prints useful tokens/s both ways and the ratio, slot occupancy, and pages held vs the pages
    the live tokens need.
  fixed-length: 4 prompts x k=32, 128 new tokens each (nothing to recover): tokens/s of the
    static sampler, the engine with every candidate in a slot, and transformers `generate`
    (num_return_sequences=32) on the same weights.

Both sides alternate over --rounds rounds and each reports its fastest (this machine drifts),
after untimed calls: one of the static sampler (it compiles one program per shape), --warmup of
the engine (it compiles a smaller slot count for its tail once the idle slots that count would
save have cost a compilation, sample/shrink_cost.py, which over repeated calls such as GRPO's
rollouts takes a few calls; with --precompile it compiles every tail slot count in its first
call, as a long-lived process would, EngineConfig.precompile).

    .venv/bin/python bench/engine_bench.py [--slots 64 --rounds 2 --sigma 0.8]
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import time

from common import qwen2_both_ways

os.environ.setdefault("JAX_PLATFORMS", "cpu")
PAUSE_S = 2.0


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--slots", type=int, default=64)
    parser.add_argument("--page_size", type=int, default=64)
    parser.add_argument("--sigma", type=float, default=0.8)
    parser.add_argument("--max_new", type=int, default=512)
    parser.add_argument("--prompt_len", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=3, help="untimed engine calls first")
    parser.add_argument("--precompile", action="store_true",
                        help="heavy-tailed: the engine compiles every tail slot count ahead "
                        "(EngineConfig.precompile) instead of as each pays")  # fmt: skip
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=16000)
    parser.add_argument("--skip_fixed", action="store_true")
    parser.add_argument("--skip_heavy", action="store_true")
    parser.add_argument("--slots_list", default="", help="also time the engine at these "
                        "slot counts (comma-separated), heavy-tailed workload")  # fmt: skip
    args = parser.parse_args()

    import jax
    import numpy as np

    from metastone_jax.checkpoint import load_params_checkpoint
    from metastone_jax.planning import engine_memory as em
    from metastone_jax.sample import engine, sampler
    from metastone_jax.sample.processors import SamplingParams
    from metastone_jax.sprm.steps import StepTokens

    tmp, ckpt, hf_dir = qwen2_both_ways(vocab=args.vocab, hidden=args.hidden,
                                        layers=args.layers, prefix="engine-bench-")  # fmt: skip
    model, _ = load_params_checkpoint(ckpt, compute_dtype="float32")
    hf_model = None
    if not args.skip_fixed:
        import torch
        import transformers

        torch.set_num_threads(os.cpu_count())
        hf_model = transformers.Qwen2ForCausalLM.from_pretrained(hf_dir).eval()
    shutil.rmtree(tmp)
    rng = np.random.default_rng(0)
    step = StepTokens(step_ids=(7,), think_open=None, think_close=None)
    print(f"model: Qwen2 d={args.hidden} L={args.layers} V={args.vocab}, fp32; jax "
          f"{jax.__version__}, {os.cpu_count()} CPU threads")  # fmt: skip

    def alternate(sides: dict, rounds: int) -> dict:
        times = {name: [] for name in sides}
        out = {}
        for r in range(rounds):
            names = list(sides) if r % 2 == 0 else list(sides)[::-1]
            for name in names:
                time.sleep(PAUSE_S)
                t0 = time.perf_counter()
                out[name] = sides[name]()
                times[name].append(time.perf_counter() - t0)
        return {name: (min(ts), ts, out[name]) for name, ts in times.items()}

    if not args.skip_heavy:
        b, k, g = 8, 32, args.max_new
        prompts = rng.integers(10, args.vocab, (b, args.prompt_len)).tolist()
        lengths = np.exp(rng.normal(math.log(g / 4), args.sigma, (b, k)))
        limits = np.clip(np.round(lengths), 1, g).astype(np.int32)
        params = SamplingParams(temperature=0.6, top_p=0.95, repetition_penalty=1.05,
                                max_new_tokens=g)  # fmt: skip
        useful = int(limits.sum())
        # The static sampler's KV: the prompts once (shared prefix) + b*k rows of g slots. The
        # engine's pool gets those bytes less its segment's dense working set (XLA path).
        static_slots = b * args.prompt_len + b * k * g
        cfg = model.cfg
        per_token = engine.page_bytes(cfg, 1, "xla")
        work = em.engine_working_set(cfg, "xla", args.slots, args.slots, 1, k, args.prompt_len,
                                     args.page_size, g, b * k) // per_token  # fmt: skip
        pages = (static_slots - work) // args.page_size
        conf = engine.EngineConfig(slots=args.slots, page_size=args.page_size, pages=pages,
                                   precompile=args.precompile)  # fmt: skip

        def static():
            return sampler.generate(model, prompts, k=k, params=params, step=step,
                                    seeds=list(range(b)), limits=limits)  # fmt: skip

        def paged():
            return engine.generate(model, prompts, k=k, params=params, step=step,
                                   seeds=list(range(b)), limits=limits, engine=conf,
                                   return_stats=True)  # fmt: skip

        static()  # compiles (one program per shape: nothing more to warm)
        for _ in range(args.warmup):  # compiles, then the tail's slot counts as they pay
            paged()
        res = alternate({"static": static, "engine": paged}, args.rounds)
        t_s, ts_s, c_s = res["static"]
        t_e, ts_e, (c_e, stats) = res["engine"]
        assert (c_s.length == limits).all() and (c_e.length == limits).all()
        # Pages the live tokens need, rounded up to pages, at the engine's fullest moment is
        # not observable after the run; the bound below is its peak over the run.
        print(f"heavy-tailed: {b} prompts x k={k}, prompt {args.prompt_len}, max_new_tokens "
              f"{g}, lengths lognormal(median {g // 4}, sigma {args.sigma}) capped: mean "
              f"{limits.mean():.0f}, max {limits.max()}, {int((limits == g).sum())} at the cap; "
              f"{useful} useful tokens")  # fmt: skip
        print(f"  static sampler  {useful / t_s:9.1f} useful tok/s ({t_s:.2f} s; rounds "
              f"{', '.join(f'{t:.2f}' for t in ts_s)}); row occupancy "
              f"{useful / (b * k * limits.max()):.0%}")  # fmt: skip
        print(f"  engine S={args.slots} page {args.page_size}"
              f"{', every tail size precompiled' if args.precompile else ''}, pool {pages} "
              f"pages + a working "
              f"set of {work} tokens (the static cache's KV bytes)  {useful / t_e:9.1f} useful "
              f"tok/s ({t_e:.2f} s; rounds "
              f"{', '.join(f'{t:.2f}' for t in ts_e)})")  # fmt: skip
        print(f"  ratio engine / static: {t_s / t_e:.2f}x; slot occupancy "
              f"{stats.occupancy:.1%} ({stats.segments} segments, {stats.steps} steps, "
              f"{stats.prefills} prefills, {stats.preemptions} preemptions, {stats.resizes} "
              f"resizes); peak pages {stats.peak_pages}; pages held / pages the live tokens "
              f"fill: worst {stats.held_over_alive:.3f}, average "
              f"{stats.held_sum / stats.alive_sum:.3f}")  # fmt: skip
        differ = int((c_s.tokens != c_e.tokens).any(axis=-1).sum())
        print(
            f"  candidates whose tokens differ from the static sampler's: {differ} of {b * k} "
            "(fp32 rounding of other sums can flip a near-tie draw; a flip changes the rest)"
        )
        for slots in [int(x) for x in args.slots_list.split(",") if x.strip()]:
            conf_s = engine.EngineConfig(slots=slots, page_size=args.page_size, pages=pages)
            run = lambda c=conf_s: engine.generate(  # noqa: E731
                model, prompts, k=k, params=params, step=step, seeds=list(range(b)),
                limits=limits, engine=c, return_stats=True,
            )  # fmt: skip
            run()
            time.sleep(PAUSE_S)
            t0 = time.perf_counter()
            _, st = run()
            dt = time.perf_counter() - t0
            print(f"  engine S={slots}: {useful / dt:9.1f} useful tok/s ({dt:.2f} s), "
                  f"{t_s / dt:.2f}x static; occupancy {st.occupancy:.1%}, {st.steps} steps, "
                  f"{st.segments} segments")  # fmt: skip

    if not args.skip_fixed:
        b, k, g = 4, 32, 128
        prompts = rng.integers(10, args.vocab, (b, args.prompt_len)).tolist()
        params = SamplingParams(temperature=0.6, top_p=0.95, repetition_penalty=1.05,
                                max_new_tokens=g)  # fmt: skip
        conf = engine.EngineConfig(slots=b * k, page_size=args.page_size)

        def static_fixed():
            return sampler.generate(model, prompts, k=k, params=params, step=step,
                                    seeds=list(range(b)))  # fmt: skip

        def paged_fixed():
            return engine.generate(model, prompts, k=k, params=params, step=step,
                                   seeds=list(range(b)), engine=conf)  # fmt: skip

        import torch

        input_ids = torch.tensor(prompts)

        def hf_fixed():  # the same weights, converted back JAX -> HF, fp32
            with torch.no_grad():
                return hf_model.generate(
                    input_ids, attention_mask=torch.ones_like(input_ids), do_sample=True,
                    temperature=0.6, top_p=0.95, repetition_penalty=1.05, max_new_tokens=g,
                    min_new_tokens=g, num_return_sequences=k, pad_token_id=0,
                )  # fmt: skip

        static_fixed(), paged_fixed(), hf_fixed()
        res = alternate({"static": static_fixed, "engine": paged_fixed,
                         "transformers": hf_fixed}, args.rounds)  # fmt: skip
        n = b * k * g
        t_s, ts_s, _ = res["static"]
        t_e, ts_e, _ = res["engine"]
        t_h, ts_h, _ = res["transformers"]
        print(f"fixed-length: {b} prompts x k={k}, prompt {args.prompt_len}, {g} new tokens")
        print(f"  static sampler  {n / t_s:9.1f} tok/s ({', '.join(f'{t:.2f}' for t in ts_s)} s)")
        print(f"  engine S={b * k} page {args.page_size}  {n / t_e:9.1f} tok/s "
              f"({', '.join(f'{t:.2f}' for t in ts_e)} s)")  # fmt: skip
        print(f"  transformers generate  {n / t_h:9.1f} tok/s "
              f"({', '.join(f'{t:.2f}' for t in ts_h)} s)")  # fmt: skip
        print(f"  ratio engine / static: {t_s / t_e:.2f}x; engine / transformers: "
              f"{t_h / t_e:.2f}x; static / transformers: {t_h / t_s:.2f}x")  # fmt: skip


if __name__ == "__main__":
    main()
