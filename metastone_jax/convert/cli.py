"""`metastone-jax convert hf-to-jax | jax-to-hf`: a HF checkpoint directory (config.json,
*.safetensors, score_module.pt) to a params checkpoint (orbax + config), and back.

  metastone-jax convert hf-to-jax --hf_dir=MetaStone-S1-1.5B --out=ckpt/s1-1.5b
  metastone-jax convert jax-to-hf --ckpt=ckpt/s1-1.5b --out=export/s1-1.5b

`metastone-jax convert DIRECTION --help` describes each direction's flags.
"""

from __future__ import annotations

import json
import os

import jax

from metastone_jax.cli_common import Parser
from metastone_jax.convert import hf
from metastone_jax.convert.hf import DEFAULT_MAX_SHARD_SIZE
from metastone_jax.sharding import MESH_FORM, make_mesh, parse_mesh, resolve_mesh_shape


def parser() -> Parser:
    p = Parser(prog="metastone-jax convert", description=__doc__)
    sub = p.add_subparsers(dest="direction", required=True, metavar="DIRECTION")
    a = sub.add_parser("hf-to-jax", help="HF directory -> params checkpoint (orbax + config)")
    a.add_argument("--hf_dir", required=True, help="config.json + *.safetensors [+ score_module]")
    a.add_argument("--out", required=True, help="checkpoint directory to create")
    a.add_argument("--dtype", default=None, help="bf16 | fp32 (default: the checkpoint's)")
    a.add_argument("--mesh", default=None, metavar=MESH_FORM,
                   help="place the weights over this mesh, e.g. data:1,fsdp:-1,tensor:1 (missing "
                   "axes 1, one may be -1: the remaining devices; default: 1 device)")  # fmt: skip
    a.add_argument("--seed", type=int, default=0, help="SPRM head init when no score_module")
    a.add_argument("--overwrite", action="store_true")
    b = sub.add_parser("jax-to-hf", help="params checkpoint -> HF directory")
    b.add_argument("--ckpt", required=True)
    b.add_argument("--out", required=True, help="HF directory to create")
    b.add_argument("--dtype", default=None, help="bf16 | fp32 | fp16 (default: the source's)")
    b.add_argument("--max_shard_size", default=DEFAULT_MAX_SHARD_SIZE)
    b.add_argument(
        "--score_module",
        default="pt",
        choices=("pt", "safetensors", "both", "none"),
        help="how to write the SPRM head (pt needs torch)",
    )
    b.add_argument("--overwrite", action="store_true")
    p.epilog = "flags of each direction:\n" + "".join(
        "  " + d.format_usage().removeprefix("usage: ") for d in (a, b)
    )
    return p


def main(argv: list[str]) -> None:
    args = parser().parse_args(argv)
    if args.direction == "hf-to-jax":
        mesh = None
        if args.mesh:
            mesh = make_mesh(resolve_mesh_shape(parse_mesh(args.mesh), jax.device_count()))
        meta = hf.hf_to_jax(
            args.hf_dir, args.out, dtype=args.dtype, mesh=mesh, overwrite=args.overwrite,
            seed=args.seed,
        )  # fmt: skip
        head = meta["source"]["score_module"]
        sprm = head["file"] if head else f"initialised from seed {args.seed} (no score_module)"
        print(f"wrote {args.out} (weights {meta['source']['dtype']}; SPRM head: {sprm})")
    else:
        files = hf.jax_to_hf(
            args.ckpt, args.out, dtype=args.dtype, max_shard_size=args.max_shard_size,
            score_format=args.score_module, overwrite=args.overwrite,
        )  # fmt: skip
        with open(os.path.join(args.out, hf.CONFIG_FILE)) as f:
            architectures = json.load(f).get("architectures") or ["?"]
        print(f"wrote {args.out} ({', '.join(architectures)}): {', '.join(files)}")
