"""The settings each cached demo stage was made with (train/policy_and_heads.py and
demo/pipeline.py run the stages), and `write_text`, the atomic write the stages use.

The demo resumes by reusing finished stages (WORKDIR/sft, spr/*.npz, spr/<form>, eval). Before a
stage runs or is reused, `claim` compares the settings it depends on (its own and every upstream
stage's) with the stamp beside its output, `<output>.stage.json`: other settings over an existing
output are an error that names the setting, so a changed config never mixes a stale stage into
new results. A stage with no output yet takes the new stamp; an output without a stamp (a
workdir from before stamps) is taken as made with the current settings.
"""

from __future__ import annotations

import json
import os

from etils import epath

from metastone_jax import files


def plain(section) -> object:
    """ConfigDicts, dicts and tuples as JSON values (tuples become lists, as in the stamp)."""
    return json.loads(json.dumps(section, default=lambda c: c.to_dict()))


def sft_settings(cfg) -> dict:
    return {"seed": int(cfg.seed), **{key: plain(cfg[key]) for key in ("task", "model", "sft")}}


def rollout_settings(cfg, first: int, count: int) -> dict:
    return {**sft_settings(cfg), "sampling": plain(cfg.sampling),
            "rollouts": {"first_prompt": first, "prompts": count, "k": int(cfg.spr.k)}}  # fmt: skip


def head_settings(cfg, form: str) -> dict:
    s = cfg.spr
    fit = {"form": form, "steps": int(s.steps), "batch": int(s.batch), "lr": float(s.lr),
           "held_out_fraction": float(s.held_out_fraction),
           "warmup_bce_steps": int(s.warmup_bce_steps) if form != "bce" else 0}  # fmt: skip
    return {**rollout_settings(cfg, 0, int(s.rollout_prompts)), "head": fit}


def eval_settings(cfg, forms) -> dict:
    """Every head's settings, and the pool's questions and samples (the k lists and the batch
    size do not change a candidate: beam results are kept per k)."""
    e = cfg.eval
    return {**rollout_settings(cfg, 0, int(cfg.spr.rollout_prompts)),
            "heads": {form: head_settings(cfg, form)["head"] for form in forms},
            "eval": {"questions": int(e.questions), "samples": int(e.samples)}}  # fmt: skip


def stamp_path(output: str) -> str:
    output = os.fspath(output)  # gs://: normpath would fold the "//" of the scheme
    output = output.rstrip("/") if files.is_remote(output) else os.path.normpath(output)
    return os.path.splitext(output)[0] + ".stage.json"


def _first_difference(old, new, key: str = "") -> tuple[str, object, object] | None:
    if isinstance(old, dict) and isinstance(new, dict):
        for k in sorted(set(old) | set(new)):
            diff = _first_difference(old.get(k), new.get(k), f"{key}.{k}" if key else k)
            if diff:
                return diff
        return None
    return None if old == new else (key, old, new)


def claim(output: str, settings: dict, *, output_exists: bool) -> None:
    """Raises if `output` exists and its stamp holds other settings than `settings`; otherwise
    (re)writes the stamp, atomically."""
    path = stamp_path(output)
    settings = plain(settings)
    if output_exists and epath.Path(path).exists():
        old = json.loads(epath.Path(path).read_text(encoding="utf-8"))
        diff = _first_difference(old, settings)
        if diff is None:
            return
        key, was, now = diff
        raise ValueError(
            f"{output} was made with {key}={was!r} and this run has {key}={now!r} ({path}); "
            "use another workdir, or remove it to make that stage again"
        )
    write_text(path, json.dumps(settings, indent=1))


def write_text(path: str, text: str) -> None:
    """`text` + newline at `path`, atomically (files.write_text; local or gs://)."""
    files.write_text(path, text + "\n")
