"""The command-line convention every `metastone-jax` command follows (main.py and the commands'
cli.py modules use this; nothing below the CLIs does).

- Flags are argparse flags of the form --name=VALUE. `-h` / `--help` prints the command's usage
  and every flag and exits 0; a bad, missing or unknown flag exits 1 with one line that names it
  (`Parser`).
- A command that runs on a config takes --config=PRESET (a preset of the command's packaged
  config files, metastone_jax/configs) or --config=FILE.py[:PRESET], and any number of
  --config.SECTION.KEY=VALUE overrides; an unknown key lists the valid ones (`add_config_flags`,
  `parse`, `load_config`).
- A mesh is --mesh=data:N,fsdp:N,tensor:N, parsed by `metastone_jax.sharding.parse_mesh`.
"""

from __future__ import annotations

import argparse
import textwrap
from collections.abc import Sequence

from absl import flags
from ml_collections import config_flags

from metastone_jax import configs
from metastone_jax.sharding import MESH_FORM, parse_mesh

OVERRIDE = "--config."


class Parser(argparse.ArgumentParser):
    """argparse with the convention above: no abbreviated flags, descriptions printed as written,
    and errors as one line (SystemExit with a message: exit status 1)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        raise SystemExit(f"{self.prog}: {message} (`{self.prog} --help` lists the flags)")


def add_config_flags(parser: Parser, names: Sequence[str], default: str) -> None:
    """--config (a preset of the packaged config files `names`, or a file; default `default`) and
    the --config.SECTION.KEY=VALUE overrides, listed with the sections of the default config."""
    valid = configs.choices(names)
    config = configs.load(*valid[default])
    sections = sorted(k for k, v in config.items() if hasattr(v, "keys"))
    keys = sorted(k for k, v in config.items() if not hasattr(v, "keys"))
    files = ", ".join(f"configs/{n}" for n in names)
    text = (
        "--config=PRESET|FILE.py[:PRESET] picks the config; --config.SECTION.KEY=VALUE overrides "
        "one of its keys (repeatable; an unknown key lists the valid ones)."
    )
    lines = textwrap.wrap(text, 96) + textwrap.wrap(f"sections: {', '.join(sections)}", 96)
    if keys:
        lines += textwrap.wrap(f"top-level keys (--config.KEY=VALUE): {', '.join(keys)}", 96)
    group = parser.add_argument_group("config", "\n".join(lines))
    group.add_argument(
        "--config", default=default, metavar="PRESET|FILE.py[:PRESET]",
        help=f"a preset of {files}: {', '.join(valid)}; or a config file "
        f"(default: {default})",
    )  # fmt: skip


def add_workdir_flag(parser: Parser, what: str) -> None:
    """--workdir=DIR, described by `what` (what the command writes and resumes there)."""
    parser.add_argument("--workdir", default=None, metavar="DIR", help=what)


def add_mesh_flag(parser: Parser, what: str) -> None:
    parser.add_argument(
        "--mesh", default=None, metavar=MESH_FORM,
        help=f"{what}; missing axes are 1 and one size may be -1 (the remaining devices)",
    )  # fmt: skip


def parse(parser: Parser, argv: Sequence[str]) -> argparse.Namespace:
    """The flags of `argv`; the --config.KEY=VALUE overrides are left in `args.overrides`, and any
    other flag the parser does not know is an error (one line)."""
    args, extra = parser.parse_known_args(list(argv))
    for arg in extra:
        if not arg.startswith(OVERRIDE):
            parser.error(f"unknown argument {arg!r}")
    args.overrides = extra
    return args


def load_config(
    prog: str, config: str, overrides: Sequence[str], names: Sequence[str], flag: str = "--config"
):
    """The ConfigDict of --config=`config` (resolved against the packaged files `names`) with
    `overrides` applied by ml_collections. Errors (unknown preset or file, unknown override key,
    bad value) exit with one line naming the flag and, for keys, the valid ones."""
    try:
        resolved = configs.resolve(config, names, flag=flag)
    except ValueError as e:
        raise SystemExit(f"{prog}: {e}") from None

    def parse(args):
        fv = flags.FlagValues()
        try:  # the config file is loaded here, and again with the overrides by fv(...)
            config_flags.DEFINE_config_file("config", resolved, "config file:preset",
                                            flag_values=fv, sys_argv=[prog, *args])  # fmt: skip
            fv([prog, *args])
        except flags.Error as e:
            lines = [ln for ln in str(e).splitlines() if ln.strip()]
            # config_flags embeds the config file's traceback; its last line is the reason.
            reason = lines[-1] if "Traceback" in str(e) else str(e).replace("\n", " ")
            head = lines[0] if reason != lines[0] and "Traceback" in str(e) else ""
            raise SystemExit(f"{prog}: {head} {reason}".replace("  ", " ")) from None
        return fv.config

    base = parse([])
    for arg in overrides:  # unknown keys: name the valid ones (absl's own message does not)
        node, path = base, []
        for part in arg[len(OVERRIDE) :].split("=", 1)[0].split("."):
            if not hasattr(node, "keys") or part not in node:
                valid = sorted(node.keys()) if hasattr(node, "keys") else []
                where = ".".join(["config", *path])
                raise SystemExit(f"{prog}: {arg}: {where} has no key {part!r}; valid keys: {valid}")
            node, path = node[part], [*path, part]
    return parse(list(overrides)) if overrides else base


def apply_mesh(prog: str, config, mesh: str | None, overrides: Sequence[str]) -> None:
    """--mesh=data:N,fsdp:N,tensor:N sets config.mesh (all three axes); with a
    --config.mesh.AXIS=N override as well it is an error: the two say the same thing."""
    if mesh is None:
        return
    if any(arg.startswith(f"{OVERRIDE}mesh.") for arg in overrides):
        raise SystemExit(f"{prog}: --mesh and {OVERRIDE}mesh.AXIS=N both set the mesh: give one")
    try:
        config.mesh.update(parse_mesh(mesh))
    except ValueError as e:
        raise SystemExit(f"{prog}: {e}") from None
