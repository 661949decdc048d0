"""Peak host memory of HF <-> JAX conversion, relative to the checkpoint size on disk.

Builds a Qwen2 model of a few hundred MB offline with transformers, then measures, each in a
fresh process, the peak resident memory that `hf_to_jax` and `jax_to_hf` add on top of the
process after imports (VmHWM reset through /proc/self/clear_refs). Peer: transformers'
`from_pretrained` + `save_pretrained` of the same checkpoint, measured the same way.

    .venv/bin/python bench/convert_memory.py [--hidden 1024 --layers 8 --dtype bfloat16]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

CHILD = r"""
import json, os, sys
os.environ.setdefault("JAX_PLATFORMS", "cpu")
import jax, numpy, torch, transformers  # imports happen before the baseline
from metastone_jax.convert.hf import hf_to_jax, jax_to_hf

def rss(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024
what, src, dst = sys.argv[1:4]
open("/proc/self/clear_refs", "w").write("5")  # reset the peak (VmHWM) to the current RSS
base = rss("VmRSS")
if what == "hf_to_jax":
    hf_to_jax(src, dst, progress=False)
elif what == "jax_to_hf":
    jax_to_hf(src, dst, progress=False)
else:
    model = transformers.AutoModelForCausalLM.from_pretrained(src, dtype="auto")
    model.save_pretrained(dst)
print(json.dumps({"peak_added": rss("VmHWM") - base}))
"""


def measure(what: str, src: str, dst: str) -> int:
    out = subprocess.run(
        [sys.executable, "-c", CHILD, what, src, dst], capture_output=True, text=True, check=False
    )
    if out.returncode:
        raise SystemExit(f"{what} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_added"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    args = parser.parse_args()

    import torch
    import transformers

    config = transformers.Qwen2Config(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.hidden * 11 // 4,
        num_hidden_layers=args.layers,
        num_attention_heads=args.hidden // 128,
        num_key_value_heads=max(1, args.hidden // 512),
        tie_word_embeddings=False,
    )
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMP", "/tmp")) as tmp:
        hf_dir = os.path.join(tmp, "hf")
        model = transformers.Qwen2ForCausalLM(config).to(getattr(torch, args.dtype))
        model.save_pretrained(hf_dir)
        del model
        size = sum(
            os.path.getsize(os.path.join(hf_dir, f))
            for f in os.listdir(hf_dir)
            if f.endswith(".safetensors")
        )
        rows = [
            ("metastone-jax hf_to_jax", measure("hf_to_jax", hf_dir, os.path.join(tmp, "ckpt"))),
            (
                "metastone-jax jax_to_hf",
                measure("jax_to_hf", os.path.join(tmp, "ckpt"), os.path.join(tmp, "back")),
            ),
            ("transformers load+save", measure("transformers", hf_dir, os.path.join(tmp, "hf2"))),
        ]
    print(
        f"checkpoint: Qwen2 d={args.hidden} L={args.layers} V={args.vocab} {args.dtype}, "
        f"{size / 2**20:,.0f} MiB on disk"
    )
    for name, peak in rows:
        mib = peak / 2**20
        print(
            f"  {name:<26} peak host memory added {mib:8,.0f} MiB = {peak / size:.2f}x checkpoint"
        )


if __name__ == "__main__":
    main()
