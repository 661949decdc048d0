"""Scaling sweeps: a grid over model size x k x thinking budget, run locally in sequence
(resumable) or printed as one launch command per point; then the law fit, table and plot.

Per point (size, k, budget): M = floor(candidates_per_point / k) * k candidates are sampled for
each of the held-out questions (G = M / k disjoint groups of k, docs/method.md section 5); each
group selects its candidate by the SPRM geometric mean of the step scores (argmax, ties to the
first) and accuracy is the mean over groups and questions. Points of one size and budget with
the same M (every k dividing candidates_per_point) share one sampling run in this process: the
metric is defined over the same M samples, so this changes no number, only the time taken.

Compute per question is law.question_compute over the k candidates of a group, averaged over
groups and questions. Measured wall time per question = sampling seconds / (questions * G),
where compilation is excluded: a chunk of questions with a shape not seen before compiles and
is not timed (its samples are kept); if no chunk was timed, the first one is sampled again,
timed. Chunks are padded (repeating their questions) to one size so that they share a shape.

Files in WORKDIR: points.jsonl (one line per finished point, appended and flushed; finished
points are skipped on a re-run, a truncated last line is dropped), models/SIZE (the trainer's
workdir), and the report: table.md, scaling.png, fit.json.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shlex
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import numpy as np
from etils import epath
from tqdm import tqdm

from metastone_jax import files
from metastone_jax.answers import answers_match, extract_final_answer
from metastone_jax.checkpoint import load_policy
from metastone_jax.data.synthetic import make_examples
from metastone_jax.evaluate.harness import encode_question
from metastone_jax.model import param_counts
from metastone_jax.presets import get_preset
from metastone_jax.sample import engine
from metastone_jax.sample.processors import SamplingParams
from metastone_jax.scaling import law
from metastone_jax.sharding import maybe_initialize_distributed
from metastone_jax.sprm.aggregation import aggregate, select
from metastone_jax.train.policy_and_heads import train_for_sweep

POINTS_FILE = "points.jsonl"
MODELS_DIR = "models"
Trainer = Callable[[str, dict, str], str]


@dataclasses.dataclass(frozen=True)
class Point:
    """One run of the grid: a model size, k, and a thinking budget (None: off)."""

    size: str
    k: int
    budget: int | None
    candidates: int  # M = groups * k sampled per question

    @property
    def groups(self) -> int:
        return self.candidates // self.k

    @property
    def point_id(self) -> str:
        budget = "none" if self.budget is None else str(self.budget)
        return f"size={self.size}/k={self.k}/budget={budget}"


class SweepResult(NamedTuple):
    points: list[dict]  # finished point records of the grid (grid order)
    fit: law.LawFit | None
    commands: list[str]  # print_commands: one launch command per point


def _is_int(x) -> bool:
    return isinstance(x, int | np.integer) and not isinstance(x, bool)


def _size_estimate(overrides) -> int:
    """~ block parameters (L * (4 D^2 + 3 D F)) over the demo preset: orders the sizes (config
    dicts sort their keys by name)."""
    base = get_preset("demo")
    d, n, f = (overrides.get(x, getattr(base, x)) for x in ("d_model", "n_layers", "d_ff"))
    return n * (4 * d * d + 3 * d * f)


def expand_grid(config) -> list[Point]:
    """The points of config.sizes x config.ks x config.think_budgets (in that nesting order;
    sizes from small to large by their estimated parameter count, then by name)."""
    sizes = dict(config.sizes)
    if not sizes:
        raise ValueError("config.sizes: expected at least one model size")
    for name, overrides in sizes.items():
        if not name or any(c in name for c in "/= "):
            raise ValueError(f"config.sizes: size name {name!r}: expected no '/', '=' or space")
        if not hasattr(overrides, "keys"):
            raise ValueError(f"config.sizes.{name}: expected a dict of model overrides")
    per_point = config.candidates_per_point
    if not _is_int(per_point) or per_point < 1:
        raise ValueError(f"config.candidates_per_point: expected an int >= 1, got {per_point!r}")
    ks = list(config.ks)
    if not ks or not all(_is_int(k) and 1 <= k <= per_point for k in ks):
        raise ValueError(
            f"config.ks: expected ints in [1, candidates_per_point={per_point}], got {ks}"
        )
    budgets = list(config.think_budgets)
    if not budgets or not all(b is None or (_is_int(b) and b >= 0) for b in budgets):
        raise ValueError(f"config.think_budgets: expected None or ints >= 0, got {budgets}")
    points = [
        Point(name, int(k), None if b is None else int(b), (per_point // k) * k)
        for name in sorted(sizes, key=lambda n: (_size_estimate(sizes[n]), n))
        for k in ks
        for b in budgets
    ]
    ids = [p.point_id for p in points]
    if len(set(ids)) != len(ids):
        raise ValueError(
            f"config: the grid repeats points: {sorted(i for i in ids if ids.count(i) > 1)}"
        )
    return points


def settings(config, point: Point) -> dict:
    """What a point's result depends on besides its id: checked when a run is resumed."""
    return {
        "model": dict(config.sizes[point.size]),
        "questions": int(config.questions),
        "candidates": point.candidates,
        "temperature": float(config.sampling.temperature),
        "top_p": float(config.sampling.top_p),
        "top_k": int(config.sampling.get("top_k", 0)),
        "max_new_tokens": int(config.sampling.max_new_tokens),
        "seed": int(config.seed),
        "task": dict(config.task),
    }


def launch_commands(config, workdir: str, *, config_arg: str, overrides: Sequence[str] = ()):
    """One command per point from config.tpu.command (fields: name, zone, config, workdir,
    point_id, overrides): deterministic text, in grid order."""
    tpu = config.tpu
    extra = "".join(" " + shlex.quote(o) for o in overrides)
    return [
        tpu.command.format(name=tpu.name, zone=tpu.zone, config=config_arg,
                           workdir=tpu.workdir or workdir, point_id=p.point_id, overrides=extra)
        for p in expand_grid(config)
    ]  # fmt: skip


def read_points(path: str) -> dict[str, dict]:
    """point_id -> record from points.jsonl (first record of an id wins). A truncated last line
    (an interrupted append) is dropped; a last line without its newline gets one, so the next
    append starts a line. Any other bad line raises."""
    if not epath.Path(path).exists():
        return {}
    text = epath.Path(path).read_text(encoding="utf-8")
    lines = text.split("\n")
    done, good = {}, []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            rec["point_id"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            if i == len(lines) - 1:  # no newline after it: the append was cut off
                print(f"sweep: {path}: dropping a truncated last line ({len(line)} chars)")
                break
            raise ValueError(f"{path}:{i + 1}: not a point record ({e})") from None
        good.append(line)
        done.setdefault(rec["point_id"], rec)
    if text and not text.endswith("\n"):
        _rewrite(path, good)
    return done


def _rewrite(path: str, lines: list[str]) -> None:
    files.write_text(path, "".join(line + "\n" for line in lines))


def _append(path: str, record: dict) -> None:
    with files.AppendLog(path, fsync=True) as log:
        log.append(json.dumps(record, sort_keys=True) + "\n")


def run_sweep(
    config,
    workdir: str,
    *,
    trainer: Trainer | None = None,
    print_commands: bool = False,
    progress: bool = True,
    only: str | None = None,
    config_arg: str = "configs/sweeps/cpu.py",
    overrides: Sequence[str] = (),
) -> SweepResult:
    """Runs (or resumes) the sweep in `workdir`, then writes the report; see the module doc.

    trainer(size_name, model_overrides, size_workdir, sampling=dict(config.sampling)) -> params
    checkpoint dir (with its tokenizer in CKPT/hf; its SPRM head learns from rollouts sampled
    as the sweep samples); default train/policy_and_heads.py `train_for_sweep`. It is called for
    each size that has unfinished points and must itself resume or reuse finished work.
    print_commands: print one launch command per point (config_arg and overrides are passed
    on) and return them; nothing runs. only: run just this point id.
    """
    points = expand_grid(config)
    if print_commands:
        cmds = launch_commands(config, workdir, config_arg=config_arg, overrides=overrides)
        for c in cmds:
            print(c)
        return SweepResult([], None, cmds)
    if "://" in workdir:
        raise ValueError(f"--workdir={workdir}: the sweep writes plain files; give a local path "
                         "(e.g. a mounted bucket)")  # fmt: skip
    if only is not None:
        chosen = [p for p in points if p.point_id == only]
        if not chosen:
            raise ValueError(f"--only={only}: not a point of this grid; e.g. {points[0].point_id}")
    maybe_initialize_distributed()  # before any JAX call, or a multi-worker slice cannot join
    writer = jax.process_index() == 0  # only process 0 writes (multi-host runs)
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, POINTS_FILE)
    done = read_points(path)
    for p in (p for p in points if p.point_id in done):
        old, new = done[p.point_id].get("settings"), settings(config, p)
        if old != new:
            old = old or {}
            diff = {key: (old.get(key), new[key]) for key in new if old.get(key) != new[key]}
            raise ValueError(f"{path}: {p.point_id} was run with other settings (was, now): "
                             f"{diff}; use a new --workdir")  # fmt: skip
    todo = [p for p in (chosen if only is not None else points) if p.point_id not in done]
    if todo:
        if trainer is None:
            trainer = train_for_sweep
        bar = tqdm(total=len(todo), desc="sweep", unit="point", disable=not progress)
        for size in dict.fromkeys(p.size for p in todo):
            size_dir = os.path.join(workdir, MODELS_DIR, size)
            ckpt = trainer(size, dict(config.sizes[size]), size_dir,
                           sampling=dict(config.sampling))  # fmt: skip
            runner = _SizeRunner(config, ckpt)
            for p in (q for q in todo if q.size == size):
                bar.set_postfix_str(p.point_id)
                record = runner.run(p)
                record["settings"] = settings(config, p)
                if writer:
                    _append(path, record)
                done[p.point_id] = record
                bar.update(1)
        bar.close()
    finished = [done[p.point_id] for p in points if p.point_id in done]
    fit = law.write_report(finished, workdir) if writer else None
    return SweepResult(finished, fit, [])


@dataclasses.dataclass
class Samples:
    """M candidates for each of Q questions, on the host."""

    correct: np.ndarray  # [Q, M] bool
    score: np.ndarray  # [Q, M] SPRM geometric mean of the scored steps
    tokens: np.ndarray  # [Q, M] generated tokens
    steps: np.ndarray  # [Q, M] scored steps (SPRM head evaluations)
    seconds_per_question: float  # sampling wall time for M candidates, compile excluded


class _SizeRunner:
    """One checkpoint: its model, tokenizer and encoded questions; samples shared by points."""

    def __init__(self, config, ckpt: str):
        self.config, self.ckpt = config, ckpt
        self.model, self.tok, self.step = load_policy(ckpt)
        recs = list(make_examples("test", int(config.questions), int(config.seed), **config.task))
        self.prompts = [encode_question(r, self.tok) for r in recs]
        self.gold = [r["answer"] for r in recs]
        cfg = self.model.cfg
        counts = param_counts(self.model)
        embed = cfg.vocab_size * cfg.d_model
        # Policy matmul params: no input-embedding lookup, no SPRM head (law.py's convention).
        self.n_params = counts["total"] - counts["sprm_head"] - embed
        self.n_params += embed if cfg.tie_embeddings else 0
        self.total_params, self.sprm_params = counts["total"], counts["sprm_head"]
        self._samples: dict[tuple, Samples] = {}

    def samples(self, budget: int | None, m: int) -> Samples:
        if (budget, m) not in self._samples:
            self._samples[(budget, m)] = self._sample(budget, m)
        return self._samples[(budget, m)]

    def _sample(self, budget: int | None, m: int) -> Samples:
        """M candidates per question on the engine: the first `chunk_questions` questions warm
        it up (their programs compile), the rest are one timed queue (if none are left, the
        first chunk is timed again)."""
        c = self.config
        if budget is not None and self.step.think_close is None:
            raise ValueError(f"{self.ckpt}: a think budget needs '</think>' in the vocabulary")
        params = SamplingParams(
            temperature=float(c.sampling.temperature), top_p=float(c.sampling.top_p),
            top_k=int(c.sampling.get("top_k", 0)),
            max_new_tokens=int(c.sampling.max_new_tokens), stop_ids=tuple(self.tok.eos_ids),
            think_budget=budget,
        )  # fmt: skip
        q = len(self.prompts)
        seeds = [(int(c.seed) * 1_000_003 + i) % 2**31 for i in range(q)]
        chunk = max(1, min(int(c.chunk_questions), q))
        zeros = lambda dt: np.zeros((q, m), dt)
        s = Samples(zeros(bool), zeros(np.float64), zeros(np.int64), zeros(np.int64), 0.0)

        def call(idx):
            return engine.generate(self.model, [self.prompts[i] for i in idx], k=m,
                                   params=params, step=self.step,
                                   seeds=[seeds[i] for i in idx])  # fmt: skip

        first, rest = list(range(chunk)), list(range(chunk, q))
        self._grade(s, call(first), first)
        timed = rest or first
        t0 = time.perf_counter()
        cand = call(timed)
        s.seconds_per_question = (time.perf_counter() - t0) / len(timed)
        if rest:
            self._grade(s, cand, rest)
        return s

    def _grade(self, s: Samples, cand, rows: list[int]) -> None:
        """Fills s[rows] from the Candidates of prompts `rows`, in that order."""
        score = np.asarray(aggregate(cand.step_scores, cand.step_mask, "geomean"))
        for j, i in enumerate(rows):
            for r in range(s.correct.shape[1]):
                text = self.tok.decode(cand.tokens[j, r, : int(cand.length[j, r])].tolist())
                s.correct[i, r] = answers_match(extract_final_answer(text), self.gold[i])
            s.score[i], s.tokens[i] = score[j], cand.length[j]
            s.steps[i] = (cand.step_index[j] >= 0).sum(-1)  # SPRM head evaluations

    def run(self, point: Point) -> dict[str, Any]:
        """Samples (or reuses) M candidates per question and scores one point."""
        s = self.samples(point.budget, point.candidates)
        record = point_metrics(s, point, self.n_params, self.model.cfg.d_model)
        record.update(total_params=int(self.total_params), sprm_params=int(self.sprm_params),
                      ckpt=self.ckpt)  # fmt: skip
        return record


def point_metrics(s: Samples, point: Point, n_params: int, d_model: int) -> dict[str, Any]:
    """A point's record from its samples: SPRM best-of-k accuracy over G groups of k (geomean
    argmax, ties to the first), the first of each group (random choice), pass@k, compute and
    wall time per question for k candidates."""
    q, g, k = s.correct.shape[0], point.groups, point.k
    if s.correct.shape[1] != g * k:
        raise ValueError(f"{point.point_id}: {s.correct.shape[1]} samples, expected {g * k}")
    correct = s.correct.reshape(q, g, k)
    chosen = np.asarray(select(s.score.reshape(q, g, k)))  # [Q, G]
    tokens = s.tokens.reshape(q, g, k).sum(-1)
    steps = s.steps.reshape(q, g, k).sum(-1)
    compute = [law.question_compute(n_params, d_model, int(t), int(n))
               for t, n in zip(tokens.ravel(), steps.ravel(), strict=True)]  # fmt: skip
    return {
        "point_id": point.point_id, "size": point.size, "k": k, "budget": point.budget,
        "groups": g, "candidates": point.candidates, "questions": q,
        "n_params": int(n_params), "d_model": int(d_model),
        "accuracy": float(np.take_along_axis(correct, chosen[..., None], -1).mean()),
        "random_accuracy": float(correct[..., 0].mean()),  # the first of each group
        "pass_at_k": float(correct.any(-1).mean()),
        "candidate_accuracy": float(s.correct.mean()),
        "compute": float(np.mean(compute)),
        "wall_s": s.seconds_per_question / g,  # = sampling seconds / (questions * groups)
        "tokens": float(tokens.mean()), "steps": float(steps.mean()),
    }  # fmt: skip
