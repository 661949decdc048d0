"""`metastone-jax COMMAND [--flag=VALUE ...]`: the command line.

Each command lives in the module COMMANDS names and answers `metastone-jax COMMAND --help` with
its usage and flags. They share one convention (metastone_jax/cli_common.py): flags are
--name=VALUE; a config is --config=PRESET or --config=FILE.py[:PRESET] with
--config.SECTION.KEY=VALUE overrides; a mesh is --mesh=data:N,fsdp:N,tensor:N; a bad flag exits 1
with one line that names it.
"""

from __future__ import annotations

import importlib
import sys

# command -> (the module whose main(argv) runs it, what it does)
COMMANDS: dict[str, tuple[str, str]] = {
    "info": ("metastone_jax.planning.info", "parameter counts and per-device memory of a model"),
    "train": ("metastone_jax.train.cli", "run or resume a training run (SFT, GRPO + SPR)"),
    "convert": ("metastone_jax.convert.cli", "HF checkpoint <-> params checkpoint"),
    "sample": ("metastone_jax.sample.cli", "test-time scaling on prompts (best-of-k, beam)"),
    "evaluate": ("metastone_jax.evaluate.cli", "pass@1 per mode on a benchmark file"),
    "sweep": ("metastone_jax.scaling.cli", "scaling sweep: model size x k x thinking budget"),
    "plan": ("metastone_jax.train.plan_cli", "a training run's per-device memory on a TPU slice"),
    "demo": ("metastone_jax.demo.cli", "the end-to-end demo on a synthetic task (make demo)"),
}


def usage() -> str:
    lines = ["usage: metastone-jax COMMAND [--flag=VALUE ...]", "", "commands:"]
    lines += [f"  {name:<9} {summary}" for name, (_, summary) in COMMANDS.items()]
    lines += ["", "`metastone-jax COMMAND --help` lists a command's flags."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv if argv is None else argv)
    if len(argv) < 2 or argv[1] in ("-h", "--help"):
        print(usage())
        raise SystemExit(0 if len(argv) >= 2 else 2)
    command = argv[1]
    if command not in COMMANDS:
        raise SystemExit(
            f"metastone-jax: unknown command {command!r}; expected one of {tuple(COMMANDS)} "
            "(`metastone-jax --help` describes them)"
        )
    module = importlib.import_module(COMMANDS[command][0])
    try:
        return module.main(argv[2:])
    except ValueError as e:
        raise SystemExit(f"metastone-jax {command}: {e}") from None


if __name__ == "__main__":
    main()
