"""The engine at MetaStone-S1-1.5B's real shape on CPU vs transformers fp32, same weights.

A random Qwen2 with DeepSeek-R1-Distill-Qwen-1.5B's configuration (the `metastone-s1-1.5b`
preset: D 1536, L 28, 12 heads, 2 KV heads, FF 8960, V 151,936, untied), made with transformers
and saved in bf16, converted HF -> JAX. 1 prompt (64 tokens) x k=8 candidates, --new tokens each
(no EOS), temperature 0.6, top-p 0.95. Each side runs in its own process (peak RSS is its own):

  engine: bf16 weights and compute, 8 slots, 64-token pages. Prints XLA's memory analysis of the
    compiled decode segment (arguments, temporaries) against the parameters' bytes, the number
    of programs compiled during the timed runs (0: nothing recompiles as sequences grow: the
    prompt's page plus the new tokens' cross page boundaries), tok/s, peak RSS.
  transformers: the same weights in fp32, `generate(num_return_sequences=8)`, tok/s, peak RSS.

Each side times --runs calls after one warm-up call and reports its fastest.

    .venv/bin/python bench/engine_1p5b.py [--new 96 --runs 2]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
PROMPT_LEN, K, SLOTS, PAGE = 64, 8, 8, 64


def make_weights(tmp: str) -> None:
    """HF Qwen2 (bf16 safetensors) in tmp/hf and our checkpoint in tmp/ckpt."""
    import torch
    import transformers

    from metastone_jax.convert.hf import hf_to_jax
    from metastone_jax.presets import get_preset

    cfg = get_preset("metastone-s1-1.5b")
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)  # never an fp32 copy of 1.5B weights here
    config = transformers.Qwen2Config(
        vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.d_ff,
        num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.n_kv_heads, max_position_embeddings=4096,
        rope_theta=cfg.rope_theta, rms_norm_eps=cfg.rms_eps, tie_word_embeddings=False,
        eos_token_id=None, torch_dtype="bfloat16",
    )  # fmt: skip
    transformers.Qwen2ForCausalLM(config).save_pretrained(os.path.join(tmp, "hf"))
    hf_to_jax(os.path.join(tmp, "hf"), os.path.join(tmp, "ckpt"), progress=False)


def prompt() -> list[int]:
    import numpy as np

    return np.random.default_rng(0).integers(10, 150_000, PROMPT_LEN).tolist()


def run_engine(tmp: str, new: int, runs: int) -> dict:
    import jax

    from metastone_jax.checkpoint import load_params_checkpoint
    from metastone_jax.planning import engine_memory as em
    from metastone_jax.sample import engine
    from metastone_jax.sample.processors import SamplingParams
    from metastone_jax.sprm.steps import StepTokens

    model, _ = load_params_checkpoint(os.path.join(tmp, "ckpt"), compute_dtype="bfloat16")
    rss_loaded = _rss_gib()
    params_bytes = sum(x.nbytes for x in jax.tree.leaves(nnx_state(model)))
    params = SamplingParams(temperature=0.6, top_p=0.95, max_new_tokens=new)
    step = StepTokens(step_ids=(7,), think_open=None, think_close=None)
    conf = engine.EngineConfig(slots=SLOTS, page_size=PAGE)

    def call():
        return engine.generate(model, [prompt()], k=K, params=params, step=step, seeds=[0],
                               engine=conf, score_steps=False)  # fmt: skip

    call()  # compiles
    rss_first = _peak_rss_gib()
    compiles = _count_compiles()
    times, cands = timed(call, runs)
    assert (cands.length == new).all()
    recompiled = _count_compiles() - compiles
    rss_peak = _peak_rss_gib()  # before the memory analysis below compiles a copy
    cfg = model.cfg
    columns = -(-(PROMPT_LEN + new) // PAGE)
    xla = em.xla_segment_bytes(cfg, slots=SLOTS, pages=SLOTS * (columns + 1) + 1, page=PAGE,
                               prompt_len=PROMPT_LEN, max_new=new, top_p=0.95, k=K)  # fmt: skip
    return dict(
        seconds=min(times), times=times, tok_s=K * new / min(times), recompiled=recompiled,
        params_gib=params_bytes / 2**30, argument_gib=xla["argument"] / 2**30,
        temp_gib=xla["temp"] / 2**30, rss_gib=rss_peak, rss_loaded_gib=rss_loaded,
        rss_first_gib=rss_first,
    )  # fmt: skip


def nnx_state(model):
    from flax import nnx

    return nnx.state(model)


_COMPILES = [0]


def _count_compiles() -> int:
    return _COMPILES[0]


def _install_compile_counter() -> None:
    import jax

    def listener(event, *args, **kwargs):
        _COMPILES[0] += event.endswith("backend_compile_duration")

    jax.monitoring.register_event_duration_secs_listener(listener)


def run_transformers(tmp: str, new: int, runs: int) -> dict:
    import torch
    import transformers

    model = transformers.Qwen2ForCausalLM.from_pretrained(
        os.path.join(tmp, "hf"), torch_dtype=torch.float32
    ).eval()
    ids = torch.tensor([prompt()])

    def call():
        with torch.no_grad():
            return model.generate(ids, do_sample=True, temperature=0.6, top_p=0.95, top_k=0,
                                  max_new_tokens=new, min_new_tokens=new,
                                  num_return_sequences=K, pad_token_id=0)  # fmt: skip

    call()
    times, out = timed(call, runs)
    assert out.shape == (K, PROMPT_LEN + new)
    return dict(seconds=min(times), times=times, tok_s=K * new / min(times),
                threads=torch.get_num_threads(), rss_gib=_peak_rss_gib())  # fmt: skip


def timed(call, runs: int):
    """(seconds of each of `runs` calls, each after a pause, the last call's result)."""
    times = []
    for _ in range(runs):
        time.sleep(2.0)
        t0 = time.perf_counter()
        out = call()
        times.append(time.perf_counter() - t0)
    return times, out


def _rss_gib() -> float:
    """The process's resident memory now."""
    with open("/proc/self/status") as f:
        kib = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
    return kib / 2**20


def _peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2**30


def side(name: str, tmp: str, new: int, runs: int) -> dict:
    """Runs one side in a fresh process; -> its result dict."""
    out = subprocess.run(
        [sys.executable, __file__, "--side", name, "--tmp", tmp, "--new", str(new), "--runs",
         str(runs)], capture_output=True, text=True,
    )  # fmt: skip
    if out.returncode:
        raise SystemExit(f"the {name} side failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--new", type=int, default=96)
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--side", choices=("setup", "engine", "transformers"))
    parser.add_argument("--tmp")
    parser.add_argument("--weights", help="reuse the weights in this directory (made if absent; "
                        "kept)")  # fmt: skip
    parser.add_argument("--skip_transformers", action="store_true")
    args = parser.parse_args()
    if args.side == "setup":
        make_weights(args.tmp)
        print(json.dumps({}))
        return
    if args.side == "engine":
        _install_compile_counter()
        print(json.dumps(run_engine(args.tmp, args.new, args.runs)))
        return
    if args.side == "transformers":
        print(json.dumps(run_transformers(args.tmp, args.new, args.runs)))
        return
    tmp = args.weights or tempfile.mkdtemp(prefix="engine-1p5b-")
    try:
        if not os.path.isdir(os.path.join(tmp, "ckpt")):
            t0 = time.perf_counter()
            side("setup", tmp, args.new, args.runs)
            print(f"weights made and converted in {time.perf_counter() - t0:.0f} s")
        eng = side("engine", tmp, args.new, args.runs)
        hf = None if args.skip_transformers else side("transformers", tmp, args.new, args.runs)
    finally:
        if not args.weights:
            shutil.rmtree(tmp)
    print(f"MetaStone-S1-1.5B shape, 1 prompt ({PROMPT_LEN} tokens) x k={K}, {args.new} new "
          f"tokens, {os.cpu_count()} CPU threads")  # fmt: skip
    print(f"  engine (bf16, {SLOTS} slots, page {PAGE}): {eng['tok_s']:.2f} tok/s "
          f"(runs {', '.join(f'{t:.1f}' for t in eng['times'])} s); programs compiled in the "
          f"timed runs: {eng['recompiled']}")  # fmt: skip
    print(f"    RSS: {eng['rss_loaded_gib']:.2f} GiB with the weights loaded, peak "
          f"{eng['rss_first_gib']:.2f} GiB over the first call (compiling), "
          f"{eng['rss_gib']:.2f} GiB after the timed runs")  # fmt: skip
    print(f"    compiled segment (XLA memory analysis): arguments {eng['argument_gib']:.2f} GiB, "
          f"temporaries {eng['temp_gib']:.2f} GiB; parameters {eng['params_gib']:.2f} GiB "
          f"(temporaries / parameters {eng['temp_gib'] / eng['params_gib']:.2f})")  # fmt: skip
    if hf is None:
        return
    print(f"  transformers fp32 generate: {hf['tok_s']:.2f} tok/s (runs "
          f"{', '.join(f'{t:.1f}' for t in hf['times'])} s, {hf['threads']} torch threads); "
          f"peak RSS {hf['rss_gib']:.2f} GiB")  # fmt: skip
    print(f"  ratio engine / transformers: {eng['tok_s'] / hf['tok_s']:.2f}x")


if __name__ == "__main__":
    main()
