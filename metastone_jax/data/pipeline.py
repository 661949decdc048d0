"""Deterministic, checkpointable, per-host batching, and token batches for SFT and rollouts.

The record stream is a pure function of ``(seed, step)``: epoch ``e`` visits the records in the
order ``np.random.default_rng([seed, e]).permutation(N)``, epochs are concatenated, and global
batch ``i`` is stream positions ``[i*B, (i+1)*B)``. Process ``p`` of ``P`` takes rows
``[p*B/P, (p+1)*B/P)`` of every global batch and reads only those records, so the processes
together see exactly what one process with the whole batch would, and a checkpoint needs only
the step.

    it = BatchIterator(source, global_batch=64, seed=0)
    records = next(it)                              # this process's 64 / P records
    batch = sft_batch(records, tok, seq_len=2048)   # tokens/valid/loss_mask [64/P, 2048]
    ckpt["data"] = it.state(); ...; it.restore(ckpt["data"])
"""

from __future__ import annotations

import json
import numbers
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np

from metastone_jax.data.tokenizer_base import Tokenizer


class BatchIterator:
    """Endless iterator over this process's slice of each global batch (a list of records)."""

    def __init__(
        self,
        source: Sequence[Mapping[str, str]],
        *,
        global_batch: int,
        seed: int,
        process_index: int | None = None,
        process_count: int | None = None,
    ):
        if process_index is None or process_count is None:
            process_index = jax.process_index() if process_index is None else process_index
            process_count = jax.process_count() if process_count is None else process_count
        if len(source) == 0:
            raise ValueError(f"empty source {getattr(source, 'name', source)!r}")
        if global_batch <= 0 or process_count <= 0 or not 0 <= process_index < process_count:
            raise ValueError(
                f"need global_batch > 0 and 0 <= process_index < process_count, got "
                f"global_batch={global_batch}, process_index={process_index}, "
                f"process_count={process_count}"
            )
        if global_batch % process_count:
            raise ValueError(
                f"global_batch={global_batch} is not divisible by process_count={process_count}"
            )
        if not isinstance(seed, numbers.Integral) or seed < 0:
            raise ValueError(f"seed must be a non-negative int, got {seed!r}")
        seed = int(seed)
        self.source = source
        self.global_batch, self.seed = global_batch, seed
        self.process_index, self.process_count = process_index, process_count
        self.local_batch = global_batch // process_count
        self._step = 0
        self._perms: dict[int, np.ndarray] = {}  # epoch -> permutation; a batch spans <= a few

    @property
    def step(self) -> int:
        """Number of batches taken so far (the index of the next global batch)."""
        return self._step

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            if len(self._perms) > 4:
                self._perms.pop(min(self._perms))
            n = len(self.source)
            self._perms[epoch] = np.random.default_rng([self.seed, epoch]).permutation(n)
        return self._perms[epoch]

    def local_indices(self, step: int) -> np.ndarray:
        """Record indices [B/P] this process reads for global batch ``step``."""
        n = len(self.source)
        start = step * self.global_batch + self.process_index * self.local_batch
        pos = np.arange(start, start + self.local_batch, dtype=np.int64)
        epochs = pos // n
        out = np.empty_like(pos)
        for e in np.unique(epochs):
            sel = epochs == e
            out[sel] = self._perm(int(e))[pos[sel] % n]
        return out

    def __iter__(self) -> BatchIterator:
        return self

    def __next__(self) -> list[dict[str, str]]:
        idx = self.local_indices(self._step)
        getitems = getattr(self.source, "__getitems__", None)
        records = list(getitems(idx.tolist())) if getitems else [self.source[int(i)] for i in idx]
        self._step += 1
        return records

    def state(self) -> dict[str, int]:
        """JSON-serializable position: ``{"step", "seed", "size"}``."""
        return {"step": self._step, "seed": self.seed, "size": len(self.source)}

    def restore(self, state: Mapping[str, Any]) -> None:
        """Continue from ``state()``; the seed and the source size must match."""
        size = len(self.source)
        if state.get("seed") != self.seed or state.get("size") != size:
            raise ValueError(
                f"data state is for seed={state.get('seed')} size={state.get('size')}, but this "
                f"iterator has seed={self.seed} size={size}"
            )
        step = state.get("step")
        if not isinstance(step, int) or step < 0:
            raise ValueError(f"data state step must be a non-negative int, got {step!r}")
        self._step = step


def encode_prompt(record: Mapping[str, str], tokenizer: Tokenizer) -> list[int]:
    """Prompt ids: the chat template over ``messages`` with the generation prompt, or the plain
    ``prompt`` text when the tokenizer has no chat template. Use it wherever prompts are encoded
    (SFT, rollouts, evaluation), so that all of them agree."""
    if tokenizer.chat_template is None:
        return tokenizer.encode(record["prompt"])
    return tokenizer.encode_chat(json.loads(record["messages"]), add_generation_prompt=True)


def pad_id(tokenizer: Tokenizer) -> int:
    """The tokenizer's pad id, else its (first) EOS id, else 0."""
    if tokenizer.pad_id is not None:
        return tokenizer.pad_id
    return tokenizer.eos_id if tokenizer.eos_id is not None else 0


def _encode_solution(
    rec: Mapping[str, str], tokenizer: Tokenizer, spans: Sequence[tuple[int, int]]
) -> tuple[list[int], list[bool]]:
    """``encode(solution)`` and, per token, whether it is learned: a token is left out when its
    text overlaps one of the [start, end) character spans. Token offsets come from decoding
    growing prefixes (only for records with spans)."""
    text = rec["solution"]
    ids = tokenizer.encode(text)
    if not spans:
        return ids, [True] * len(ids)
    if tokenizer.decode(ids) != text:
        raise ValueError(
            f"record {rec['id']!r}: its solution does not decode back to itself, so unlearned "
            f"spans {list(spans)} cannot be mapped to tokens"
        )
    learn, begin, last = [True] * len(ids), 0, max(e for _, e in spans)
    for i in range(len(ids)):
        if begin >= last:  # past the last span: the rest is learned
            break
        end = len(tokenizer.decode(ids[: i + 1]))
        learn[i] = not any(s < end and begin < e for s, e in spans)
        begin = end
    return ids, learn


def sft_batch(
    records: Sequence[Mapping[str, str]],
    tokenizer: Tokenizer,
    *,
    seq_len: int,
    unlearned: Callable[[str], Sequence[tuple[int, int]]] | None = None,
) -> dict[str, np.ndarray]:
    """Token batch for supervised fine-tuning; b = len(records), T = seq_len.

    Row = prompt ids (:func:`encode_prompt`) + ``encode(solution)`` + EOS, right-padded with the
    pad id (EOS if none). Returns
      tokens    [b, T] int32
      valid     [b, T] bool: a real token (not padding)
      loss_mask [b, T] bool: ``tokens[t]`` is a response token (solution or the final EOS).
    Loss at position t means "predict tokens[t] from the prefix tokens[:t]", i.e. it uses the
    logits computed at position t-1 (shift the logits, not the mask). A response longer than
    the room left after the prompt is cut (dropping the EOS); a prompt that leaves no room for
    one response token raises ValueError. ``unlearned(solution)``, if given, returns [start,
    end) character spans of the solution left out of ``loss_mask`` (e.g. a deliberate slip in a
    reflective trace: ``synthetic.slip_spans``): every token that overlaps one is left out.
    """
    eos = tokenizer.eos_id
    if eos is None:
        raise ValueError(f"{tokenizer!r} has no EOS id; SFT rows end with EOS")
    pad = pad_id(tokenizer)
    b = len(records)
    tokens = np.full((b, seq_len), pad, dtype=np.int32)
    valid = np.zeros((b, seq_len), dtype=bool)
    loss_mask = np.zeros((b, seq_len), dtype=bool)
    for r, rec in enumerate(records):
        prompt = encode_prompt(rec, tokenizer)
        room = seq_len - len(prompt)
        if room < 1:
            raise ValueError(
                f"record {rec['id']!r}: prompt is {len(prompt)} tokens, seq_len={seq_len} leaves "
                "no room for a response token"
            )
        spans = unlearned(rec["solution"]) if unlearned is not None else ()
        ids, learn = _encode_solution(rec, tokenizer, spans)
        response, learn = (ids + [eos])[:room], (learn + [True])[:room]
        n = len(prompt) + len(response)
        tokens[r, :n] = prompt + response
        valid[r, :n] = True
        loss_mask[r, len(prompt) : n] = learn
    return {"tokens": tokens, "valid": valid, "loss_mask": loss_mask}


def prompt_batch(
    records: Sequence[Mapping[str, str]], tokenizer: Tokenizer, *, max_prompt_len: int
) -> tuple[list[list[int]], list[str]]:
    """Prompt ids (:func:`encode_prompt`, unpadded) and ground-truth answers, for rollouts."""
    prompts = []
    for rec in records:
        ids = encode_prompt(rec, tokenizer)
        if len(ids) > max_prompt_len:
            raise ValueError(
                f"record {rec['id']!r}: prompt is {len(ids)} tokens, longer than "
                f"max_prompt_len={max_prompt_len}"
            )
        prompts.append(ids)
    return prompts, [rec["answer"] for rec in records]
