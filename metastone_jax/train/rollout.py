"""GRPO rollouts: prompts -> k candidates from the sampler -> rewards -> a packed train batch.

Rows are laid out [left-padded prompt (width P) | generated tokens (width G)], the sampler's own
layout, so the train forward sees the same positions the rollout did. Fixed P and G keep one
compiled step for the whole run.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
from etils import epath
from flax import nnx

from metastone_jax import files
from metastone_jax.answers import answers_match, extract_final_answer
from metastone_jax.data.packing import pack_micro_batches
from metastone_jax.rl import group_advantages
from metastone_jax.sample import engine as paged_engine
from metastone_jax.sample.processors import SamplingParams
from metastone_jax.sample.sampler import LENGTH, Candidates
from metastone_jax.sprm.steps import StepTokens, shift_for_scoring, step_mask
from metastone_jax.train.run_config import RLConfig


def sample_rollouts(
    graphdef,
    params: dict,
    prompts: list[list[int]],
    *,
    k: int,
    sampling: SamplingParams,
    step: StepTokens,
    seeds: Sequence[int],
    pad_id: int,
    mesh=None,
    engine: paged_engine.EngineConfig | None = None,
    progress: bool = False,
) -> Candidates:
    """k candidates per prompt with the current policy, on the continuous-batching engine
    (`engine`: slots, page size, pool; config rl.slots, rl.page_size, rl.pages,
    rl.memory_fraction). No step scoring: the train step recomputes SPRM logits with
    gradients anyway. progress: the engine's progress bar."""
    model = nnx.merge(graphdef, params)
    return paged_engine.generate(
        model, prompts, k=k, params=sampling, step=step, seeds=list(seeds), pad_id=pad_id,
        mesh=mesh, score_steps=False, engine=engine, progress=progress,
    )  # fmt: skip


def engine_config(rl: RLConfig, planned=None) -> paged_engine.EngineConfig:
    """The rollout engine's settings from the config's rl section; slots and pages left at 0
    take the memory plan's choice (`planned`: planning.engine_memory.EnginePlan, on a TPU
    run), else the engine's defaults."""
    fraction = float(rl.memory_fraction)
    slots, pages = int(rl.slots), int(rl.pages)
    if planned is not None:
        slots = slots or planned.slots
        pages = pages or (0 if fraction > 0 else planned.pages)
    return paged_engine.EngineConfig(
        slots=slots, page_size=int(rl.page_size), pages=pages,
        memory_fraction=fraction if fraction > 0 else None, precompile=bool(rl.precompile),
    )  # fmt: skip


THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
TRUNCATED = ("exclude", "negative")  # spr.truncated


def well_formed(text: str, prefix: str = "") -> bool:
    """The released reward's format check (``math_v2.validate_response_structure``): the
    assistant's turn ``prefix + text`` holds exactly one ``<think>`` and one ``</think>``, in
    that order."""
    turn = prefix + text
    if turn.count(THINK_OPEN) != 1 or turn.count(THINK_CLOSE) != 1:
        return False
    return turn.find(THINK_OPEN) < turn.find(THINK_CLOSE)


def assistant_prefix(prompt_text: str) -> str:
    """The part of a prompt that belongs to the assistant's turn, for the format check: the
    tail from the prompt's last ``<think>`` when no ``</think>`` follows it (a chat template
    that opens the think span for the model, as R1-style "<｜Assistant｜><think>\n"), else "".
    The released check reads the text after the assistant header, so tags the prompt opens
    count and tags in the user's message do not."""
    i = prompt_text.rfind(THINK_OPEN)
    if i < 0 or THINK_CLOSE in prompt_text[i:]:
        return ""
    return prompt_text[i:]


def grade_rollouts(
    texts: list[list[str]],
    answers: list[str],
    *,
    format_check: bool = False,
    prompts: Sequence[str] | None = None,
) -> np.ndarray:
    """[B, k] float32 rule-based reward: 1 when the candidate's final answer matches.

    ``format_check`` (config rl.format_check; the released reward): 0 unless the response is
    ``well_formed``, counting the think tags the prompt text ``prompts[b]`` opens for it
    (``assistant_prefix``; no prompts: the response alone)."""
    if prompts is not None and len(prompts) != len(texts):
        raise ValueError(f"grade_rollouts: {len(prompts)} prompts for {len(texts)} rows")
    prefixes = [assistant_prefix(p) for p in prompts] if prompts is not None else [""] * len(texts)

    def reward(text: str, answer: str, prefix: str) -> float:
        if format_check and not well_formed(text, prefix):
            return 0.0
        return float(answers_match(extract_final_answer(text), answer))

    return np.array(
        [[reward(t, a, pre) for t in row]
         for row, a, pre in zip(texts, answers, prefixes, strict=True)],
        np.float32,
    )  # fmt: skip


def pack_rollouts(
    prompts: list[list[int]],
    cands: Candidates,
    rewards: np.ndarray,
    *,
    prompt_width: int,
    pad_id: int,
    truncated: str = "exclude",
) -> dict[str, np.ndarray]:
    """Train rows [B*k, P+G] from prompts, candidates [B, k, G] and rewards [B, k].

    tokens/valid/response_mask [N, P+G]; response_start [N] (= P); advantages [N] (group
    advantages over each prompt's k rollouts); labels [N] (reward, the SPR target); include [N]
    (rows the SPR loss uses).

    ``truncated`` (config spr.truncated): what the SPR loss does with wrong rollouts that ran
    out of tokens (finish "length"). "exclude" (default): every one is left out (include
    False), as docs/method.md section 3 states the method. "negative": all rows are used, the
    truncated wrong ones as negatives (label 0), which is what the released runs did: their
    reward gives 0.1 to a truncated, well-formed, answered wrong rollout (``math_v2.py``) so
    that the SPR loss drops it (``reward != 0.1``), but ``ray_trainer.py`` first zeroes the
    0.1 values in place on the tensor the SPR labels are read from, so nothing was dropped.
    """
    if truncated not in TRUNCATED:
        raise ValueError(f"spr.truncated={truncated!r}; expected one of {TRUNCATED}")
    b, k, g = cands.tokens.shape
    width = prompt_width + g
    n = b * k
    tokens = np.full((n, width), pad_id, np.int32)
    valid = np.zeros((n, width), bool)
    response = np.zeros((n, width), bool)
    for i, p in enumerate(prompts):
        if len(p) > prompt_width:
            raise ValueError(f"prompt {i}: {len(p)} tokens > prompt width {prompt_width}")
        rows = slice(i * k, (i + 1) * k)
        tokens[rows, prompt_width - len(p) : prompt_width] = p
        valid[rows, prompt_width - len(p) : prompt_width] = True
    gen = cands.tokens.reshape(n, g)
    live = np.arange(g)[None, :] < cands.length.reshape(n, 1)
    tokens[:, prompt_width:] = np.where(live, gen, pad_id)
    valid[:, prompt_width:] = live
    response[:, prompt_width:] = live
    labels = rewards.reshape(n).astype(np.float32)
    cut = cands.finish.reshape(n) == LENGTH
    include = ~(cut & (labels == 0)) if truncated == "exclude" else np.ones(n, bool)
    return {
        "tokens": tokens,
        "valid": valid,
        "response_mask": response,
        "response_start": np.full((n,), prompt_width, np.int32),
        "advantages": np.asarray(group_advantages(rewards)).reshape(n).astype(np.float32),
        "labels": labels,
        "include": include,
    }


def pack_for_training(batch: dict[str, np.ndarray], width: int, *, rows_multiple: int = 1,
                      step: StepTokens | None = None, rows: int | None = None):  # fmt: skip
    """Micro-batches [A, b, T] -> packed rows [A, R, width] (data/packing.py), each
    micro-batch on its own (R: `rows`, default the most any needs). With `step` (the SPR loss)
    the step mask is taken per sequence first ("spr_mask", feature positions), since its
    think-tag bounds are per sequence."""
    batch = dict(batch)
    start = batch.pop("response_start", None)
    if step is not None and "labels" in batch:
        a, b, t = batch["tokens"].shape
        flat = {k: v.reshape(a * b, *v.shape[2:]) for k, v in batch.items()}
        mask = step_mask(flat["tokens"], step, mode="train", valid=flat["valid"],
                         response_start=None if start is None else start.reshape(-1))  # fmt: skip
        batch["spr_mask"] = np.asarray(shift_for_scoring(mask)).reshape(a, b, t)
    return pack_micro_batches(batch, width, rows_multiple=rows_multiple, rows=rows)


def split_micro(batch: dict[str, np.ndarray], parts: int) -> dict[str, np.ndarray]:
    """[N, ...] -> [parts, N/parts, ...] (rows in order)."""
    n = len(next(iter(batch.values())))
    if n % parts:
        raise ValueError(f"{n} rows cannot be split into {parts} equal micro-batches")
    return {k: v.reshape(parts, n // parts, *v.shape[1:]) for k, v in batch.items()}


def minibatches(batch: dict[str, np.ndarray], parts: int) -> list[dict[str, np.ndarray]]:
    """The rows [N, ...] split into `parts` consecutive mini-batches (one update each)."""
    n = len(next(iter(batch.values())))
    if n % parts:
        raise ValueError(f"{n} rollouts cannot be split into {parts} equal mini-batches")
    size = n // parts
    return [{k: v[i * size : (i + 1) * size] for k, v in batch.items()} for i in range(parts)]


ROLLOUT_FILE = "step_{:06d}.npz"


def save_rollouts(directory: str, step: int, rows: dict[str, np.ndarray]) -> str:
    """Writes packed rows to DIRECTORY/step_NNNNNN.npz (local or gs://), atomically."""
    path = os.path.join(directory, ROLLOUT_FILE.format(step))
    with files.staged_file(path) as tmp:
        np.savez(tmp, **rows)
    return path


class SavedRollouts:
    """Rollout files saved by a GRPO run, replayed in order (cycling): the data of a head-only
    SPR run (`kind='spr'`, `optim.freeze_backbone=True`). State: the number of files consumed."""

    KEYS = ("tokens", "valid", "response_mask", "response_start", "labels", "include")

    def __init__(self, directory: str):
        self.files = sorted(os.fspath(p) for p in epath.Path(directory).glob("step_*.npz"))
        if not self.files:
            raise ValueError(f"{directory}: no saved rollouts (step_*.npz); run GRPO with "
                             "--config.data.save_rollouts=True first")  # fmt: skip
        self.step = 0

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        path = self.files[self.step % len(self.files)]
        self.step += 1
        with epath.Path(path).open("rb") as fh, np.load(fh) as f:
            missing = [k for k in self.KEYS if k not in f]
            if missing:
                raise ValueError(f"{path}: not a rollout file (missing {missing})")
            return {k: f[k] for k in self.KEYS}

    def state(self) -> dict:
        return {"step": self.step, "files": len(self.files)}

    def restore(self, state: dict) -> None:
        if state.get("files") != len(self.files):
            raise ValueError(
                f"saved rollouts changed: the checkpoint consumed a directory of "
                f"{state.get('files')} files, now {len(self.files)}"
            )
        self.step = int(state["step"])
