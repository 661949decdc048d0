"""`metastone-jax sample`: test-time scaling on prompts with a params checkpoint.

  metastone-jax sample --ckpt=ckpt/s1-1.5b --prompt="What is 12 + 30?" --mode=high

Samples k candidates per prompt (--mode low / medium / high: k = 2 / 8 / 32, or --k), scores
their steps with the SPRM head inside the decode loop, selects one by --strategy, and prints it
with every candidate's score (--json: machine-readable).
"""

from __future__ import annotations

import dataclasses
import json
import sys

from metastone_jax.checkpoint import load_policy
from metastone_jax.cli_common import Parser
from metastone_jax.sample import search
from metastone_jax.sample.engine import EngineConfig
from metastone_jax.sample.processors import SamplingParams
from metastone_jax.sample.sampler import FINISH_REASONS
from metastone_jax.sample.search import MODES, SELECTIONS, STRATEGIES


def parser() -> Parser:
    p = Parser(prog="metastone-jax sample", description=__doc__)
    p.add_argument("--ckpt", required=True, help="params checkpoint (from `convert hf-to-jax`)")
    p.add_argument("--prompt", action="append", required=True, help="repeat for a batch")
    p.add_argument("--mode", default="medium", choices=tuple(MODES), help="k = 2 / 8 / 32")
    p.add_argument("--k", type=int, default=None, help="candidates per prompt (overrides mode)")
    p.add_argument("--strategy", default="best_of_k", help="|".join(STRATEGIES))
    p.add_argument("--aggregation", default="geomean", help="geomean|mean|min|last|product")
    p.add_argument("--selection", default="response", help="|".join(SELECTIONS))
    p.add_argument(
        "--prune_below",
        type=float,
        default=None,
        help="early pruning: drop candidates whose running score falls below this",
    )
    p.add_argument(
        "--prune_keep",
        type=int,
        default=None,
        help="early pruning: keep this many candidates per prompt at each step",
    )
    p.add_argument("--beam_width", type=int, default=2)
    p.add_argument("--expansions", type=int, default=4)
    add_sampling_args(p, max_new_tokens=1024)
    add_engine_args(p)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--show_steps", action="store_true", help="print each step with its score")
    return p


def add_sampling_args(p: Parser, *, max_new_tokens: int) -> None:
    """The sampling flags shared by `sample` and `evaluate` (defaults: the released
    evaluation's temperature 0.6, top-p 0.95, repetition penalty 1.05)."""
    p.add_argument("--temperature", type=float, default=0.6)
    p.add_argument("--top_p", type=float, default=0.95)
    p.add_argument("--top_k", type=int, default=0)
    p.add_argument("--repetition_penalty", type=float, default=1.05)
    p.add_argument("--max_new_tokens", type=int, default=max_new_tokens)
    p.add_argument("--think_budget", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--step_ids", default=None, help="comma-separated step token ids "
                   "(default: the id of the step string '.\\n\\n')")  # fmt: skip
    p.add_argument("--no_chat_template", action="store_true", help="use the prompt text as-is")


def add_engine_args(p: Parser) -> None:
    """The continuous-batching engine's flags (sample/engine.py), shared by `sample` and
    `evaluate`."""
    p.add_argument("--slots", type=int, default=0,
                   help="candidates decoded together (0: all, up to 256)")  # fmt: skip
    p.add_argument("--page_size", type=int, default=0,
                   help="tokens per KV cache page (0: 64, or less to divide max_len)")  # fmt: skip
    p.add_argument("--pages", type=int, default=0, help="the KV page pool's size (0: from "
                   "--memory_fraction, else room for every slot's whole budget)")  # fmt: skip
    p.add_argument("--memory_fraction", type=float, default=None,
                   help="size the page pool to this fraction of the free memory")  # fmt: skip
    p.add_argument("--precompile", action="store_true",
                   help="compile the decode for each slot count the tail shrinks to, before "
                   "sampling (pays on long runs)")  # fmt: skip


def engine_from_args(args):
    """The `EngineConfig` of the flags of `add_engine_args`."""
    return EngineConfig(slots=args.slots, page_size=args.page_size, pages=args.pages,
                        memory_fraction=args.memory_fraction,
                        precompile=args.precompile)  # fmt: skip


def sampling_from_args(args):
    """(SamplingParams, step ids or None) from the flags of `add_sampling_args`."""
    ids = None
    if args.step_ids:
        try:
            ids = [int(i) for i in args.step_ids.split(",") if i.strip()]
        except ValueError:
            raise ValueError(
                f"--step_ids: expected comma-separated integers, got {args.step_ids!r}"
            ) from None
    params = SamplingParams(
        temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
        repetition_penalty=args.repetition_penalty, max_new_tokens=args.max_new_tokens,
        think_budget=args.think_budget,
    )  # fmt: skip
    return params, ids


def main(argv: list[str]) -> None:
    args = parser().parse_args(argv)
    params, ids = sampling_from_args(args)  # bad flags fail before the checkpoint is read
    model, tokenizer, step = load_policy(args.ckpt, step_ids=ids)
    params = dataclasses.replace(params, stop_ids=tuple(tokenizer.eos_ids))
    overrides = dict(
        strategy=args.strategy, aggregation=args.aggregation, selection=args.selection,
        beam_width=args.beam_width, expansions=args.expansions,
        prune_below=args.prune_below, prune_keep=args.prune_keep,
    )  # fmt: skip
    if args.k is not None:
        config = search.SearchConfig(k=args.k, **overrides)
    else:
        config = search.SearchConfig.for_mode(args.mode, **overrides)
    prompts = []
    for i, text in enumerate(args.prompt):
        if not text.strip():
            raise ValueError(f"--prompt {i}: empty prompt")
        if args.no_chat_template or tokenizer.chat_template is None:
            prompts.append(tokenizer.encode(text, add_special_tokens=True))
        else:
            prompts.append(tokenizer.encode_chat([{"role": "user", "content": text}]))
    result = search.run(
        model, prompts, search=config, params=params, step=step, tokenizer=tokenizer,
        seeds=[args.seed + i for i in range(len(prompts))], engine=engine_from_args(args),
    )  # fmt: skip
    report = _report(result, tokenizer, args.show_steps)
    if args.json:
        json.dump(report, sys.stdout, indent=2, ensure_ascii=False)
        print()
        return
    for item in report["prompts"]:
        sel = item["candidates"][item["selected"]]
        print(f"=== prompt {item['index']}: selected candidate {item['selected']} "
              f"(score {sel['score']:.4f}, answer {sel['answer']!r})")  # fmt: skip
        print(sel["text"])
        print("--- candidates")
        for j, c in enumerate(item["candidates"]):
            mark = "*" if j == item["selected"] else " "
            print(f" {mark}{j:3d} score {c['score']:.4f}  steps {c['n_steps']:3d}  "
                  f"{c['finish']:<7} answer {c['answer']!r}")  # fmt: skip
            for s in c.get("steps", []):
                print(f"        [{s['score']:.3f}] {s['text']!r}")
    print(f"stats: {json.dumps(report['stats'])}")


def _report(result, tokenizer, show_steps: bool) -> dict:
    c = result.candidates
    out = []
    for i in range(len(result.texts)):
        cands = []
        for j in range(len(result.texts[i])):
            mask = c.step_mask[i, j]
            item = {
                "text": result.texts[i][j],
                "answer": result.answers[i][j],
                "score": float(result.scores[i, j]),
                "n_steps": int(mask.sum()),
                "length": int(c.length[i, j]),
                "finish": FINISH_REASONS[int(c.finish[i, j])],
                "logprob": float(c.logprob[i, j]),
            }
            if show_steps:
                item["steps"] = _steps(c, i, j, tokenizer)
            cands.append(item)
        out.append({"index": i, "selected": int(result.selected[i]), "candidates": cands})
    return {"prompts": out, "stats": result.stats}


def _steps(c, i, j, tokenizer) -> list[dict]:
    """Each scored step: the text from the previous step token to this one, and its score."""
    steps, start = [], 0
    tokens = c.tokens[i, j, : c.length[i, j]].tolist()
    for s in range(c.step_mask.shape[-1]):
        if not c.step_mask[i, j, s]:
            continue
        end = int(c.step_index[i, j, s]) + 1
        steps.append({"score": float(c.step_scores[i, j, s]),
                      "text": tokenizer.decode(tokens[start:end])})  # fmt: skip
        start = end
    return steps
