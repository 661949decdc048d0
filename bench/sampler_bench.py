"""Decode throughput of the jitted sampler vs transformers' generate, in one run.

Same weights on both sides (a random Qwen2 of ~39M parameters made with transformers, converted
HF -> JAX with our converter), fp32, k=32 candidates for each of 4 prompts, fixed-length
generation (no EOS). Prints:
  - generated tokens/s: ours vs `generate(num_return_sequences=32)`, and the ratio (both sides
    alternate over --rounds rounds; each side's fastest, and the per-round ratios);
  - the share of this machine's matmul roofline (a large jnp.dot, same run) reached in decode;
  - the overhead of in-loop SPRM scoring (same sampler with scoring off);
  - the released pipeline's shape (generate, then a second full forward over every candidate
    to score its steps) divided by ours.

    .venv/bin/python bench/sampler_bench.py [--new_tokens 128 --prompt_len 64]
"""

from __future__ import annotations

import argparse
import os
import time

from common import best_time as _time
from common import matmul_roofline, qwen2_both_ways

os.environ.setdefault("JAX_PLATFORMS", "cpu")
PAUSE_S = 2.0  # before every timed call: the previous one's threads go idle


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--prompt_len", type=int, default=64)
    parser.add_argument("--new_tokens", type=int, default=128)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=16000)
    parser.add_argument("--top_p", type=float, default=0.95)
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds of each side")
    args = parser.parse_args()

    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch
    import transformers

    from metastone_jax.checkpoint import load_params_checkpoint
    from metastone_jax.sample import sampler
    from metastone_jax.sample.processors import SamplingParams
    from metastone_jax.sprm.steps import StepTokens

    # Same weights both ways: HF -> JAX for ours, JAX -> HF for transformers.
    tmp, _, _ = qwen2_both_ways(
        vocab=args.vocab, hidden=args.hidden, layers=args.layers, prefix="sampler-bench-"
    )
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(
        os.path.join(tmp, "back"), dtype=torch.float32
    ).eval()
    model, _ = load_params_checkpoint(os.path.join(tmp, "ckpt"), compute_dtype="float32")
    n_params = sum(p.numel() for p in hf_model.parameters())

    rng = np.random.default_rng(0)
    prompts = rng.integers(10, args.vocab, (args.prompts, args.prompt_len))
    g = args.new_tokens
    params = SamplingParams(temperature=0.6, top_p=args.top_p, repetition_penalty=1.05,
                            max_new_tokens=g)  # fmt: skip
    step = StepTokens(step_ids=(7,), think_open=None, think_close=None)
    n_tokens = args.prompts * args.k * g

    def ours(score=True):
        c = sampler.generate(model, prompts.tolist(), k=args.k, params=params, step=step,
                             seeds=list(range(args.prompts)), score_steps=score)  # fmt: skip
        assert (c.length == g).all()
        return c

    torch.set_num_threads(os.cpu_count())
    input_ids = torch.from_numpy(prompts)

    def hf_generate():
        with torch.no_grad():
            return hf_model.generate(
                input_ids, attention_mask=torch.ones_like(input_ids), do_sample=True,
                temperature=0.6, top_p=args.top_p, repetition_penalty=1.05, max_new_tokens=g,
                min_new_tokens=g, num_return_sequences=args.k, pad_token_id=0,
            )  # fmt: skip

    ours()  # compile
    ours(score=False)
    hf_model.generate(input_ids[:1], max_new_tokens=2, do_sample=False, pad_token_id=0)  # warm-up
    # Both sides alternate, round by round, and each side is its fastest round: this machine
    # drifts by 10-30% within minutes, so back-to-back blocks or one round of one side against
    # several of the other would measure the drift. Scoring on and off swap places every round,
    # and every timed call starts after a pause: a call right after torch's was measured slower
    # (its worker threads still spinning), which had put +9% on whichever ran first.
    on, off, hf = [], [], []

    def quiet(fn):
        time.sleep(PAUSE_S)
        return _time(fn)

    for r in range(args.rounds):
        for score in (True, False) if r % 2 == 0 else (False, True):
            (on if score else off).append(quiet(lambda s=score: ours(s)))
        time.sleep(PAUSE_S)
        t0 = time.perf_counter()
        sequences = hf_generate()
        hf.append(time.perf_counter() - t0)
    t_ours, t_ours_noscore, t_hf = min(on), min(off), min(hf)
    paired = sorted(h / o for h, o in zip(hf, on, strict=True))
    overhead = sorted(a / b - 1 for a, b in zip(on, off, strict=True))

    # The released pipeline scores afterwards: a second full forward over every candidate,
    # penultimate hidden states, the head at every position.
    d = args.hidden
    head = torch.nn.Sequential(
        torch.nn.Linear(d, 2 * d), torch.nn.ReLU(), torch.nn.Dropout(0.5), torch.nn.Linear(2 * d, 1)
    ).eval()

    def rescore():
        with torch.no_grad():
            for chunk in sequences.split(args.k):
                out = hf_model(chunk, output_hidden_states=True)
                torch.sigmoid(head(out.hidden_states[-2]))

    t_rescore = _time(rescore)

    time.sleep(PAUSE_S)
    peak = matmul_roofline()
    # Decode FLOPs: 2 x (matmul parameters) per generated token, plus attention over the cache.
    matmul_params = n_params - args.vocab * args.hidden  # the embedding lookup is no matmul
    ctx = args.prompt_len + g / 2
    attn = 4 * args.layers * ctx * args.hidden
    flops = n_tokens * (2 * matmul_params + attn)
    print(f"model: Qwen2 d={args.hidden} L={args.layers} V={args.vocab}, {n_params / 1e6:.1f}M "
          f"params, fp32; {args.prompts} prompts x k={args.k}, prompt {args.prompt_len}, "
          f"{g} new tokens each ({n_tokens} tokens); jax {jax.__version__}, "
          f"torch {torch.__version__}, {os.cpu_count()} CPU threads")  # fmt: skip
    print(f"  ours (in-loop SPRM)    {n_tokens / t_ours:10.1f} tok/s  ({t_ours:.2f} s)")
    print(f"  ours (scoring off)     {n_tokens / t_ours_noscore:10.1f} tok/s  "
          f"({t_ours_noscore:.2f} s)")  # fmt: skip
    print(f"  transformers generate  {n_tokens / t_hf:10.1f} tok/s  ({t_hf:.2f} s)")
    print(f"  ratio ours / transformers: {t_hf / t_ours:.2f}x (fastest of {args.rounds} "
          f"alternating rounds each; per round {', '.join(f'{r:.2f}' for r in paired)}x; "
          f"transformers {', '.join(f'{t:.2f}' for t in hf)} s)")  # fmt: skip
    reached = flops / t_ours
    print(f"  matmul roofline {peak / 1e9:.1f} GFLOP/s; decode reaches "
          f"{reached / 1e9:.1f} GFLOP/s = {100 * reached / peak:.0f}% of it")  # fmt: skip
    print(f"  in-loop scoring overhead: {100 * (t_ours / t_ours_noscore - 1):+.1f}% (fastest of "
          f"{args.rounds} alternating rounds; per round median "
          f"{100 * overhead[len(overhead) // 2]:+.1f}%; on {', '.join(f'{t:.2f}' for t in on)} s, "
          f"off {', '.join(f'{t:.2f}' for t in off)} s)")  # fmt: skip
    released = t_hf + t_rescore
    print(f"  released shape (generate {t_hf:.2f} s + rescoring forward {t_rescore:.2f} s) "
          f"/ ours: {released / t_ours:.2f}x")  # fmt: skip
    del jnp


if __name__ == "__main__":
    main()
