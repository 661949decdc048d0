"""Test-time scaling over a benchmark file: a resumable pool of candidates, and metrics over it.

The pool (``sample_pool``) is a JSONL file, one line per question:

    {"id", "index", "prompt", "answer" (gold), "seed",
     "candidates": [{"text", "answer" (extracted), "correct", "grade" (grading path),
                     "step_scores" (the counted steps, in order), "tokens", "finish"}]}

Metrics over such pools live in `evaluate/metrics.py` (pure numpy); ``evaluate`` ties pool,
beam search and metrics together for a checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import numpy as np
from etils import epath

from metastone_jax import files
from metastone_jax.answers import extract_final_answer
from metastone_jax.checkpoint import (
    HF_FILES_DIR,
    check_checkpoint_dir,
    load_policy,
    params_fingerprint,
    read_checkpoint_meta,
)
from metastone_jax.data.builders import read_records
from metastone_jax.data.tokenizer import load_tokenizer
from metastone_jax.evaluate.grading import grade_detail
from metastone_jax.evaluate.metrics import GROUP_COUNTS, pool_metrics, summarize
from metastone_jax.sample import engine as paged_engine
from metastone_jax.sample import search
from metastone_jax.sample.processors import SamplingParams
from metastone_jax.sample.sampler import FINISH_REASONS
from metastone_jax.sample.search import MODES

# The pass@1 method of each pool strategy; "beam" searches instead of sampling a pool.
STRATEGY_METHOD = {"best_of_k": "sprm_geomean", "vote": "vote", "weighted_vote": "weighted_vote"}
STRATEGIES = (*STRATEGY_METHOD, "beam")
POOL_FLUSH_SECS = 30.0  # a gs:// pool is uploaded at most this often (and at the end)


# ---------------------------------------------------------------------------------------------
# The pool file
# ---------------------------------------------------------------------------------------------


def question_seed(seed: int, index: int) -> int:
    """The sampler seed of question ``index`` (uint32), a function of (seed, index) only."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1)[0])


def read_pool(path: str, *, repair: bool = False) -> list[dict]:
    """The question entries of a pool file (none if it does not exist).

    A last line without its newline or not valid JSON is a write cut short (a kill): it is
    skipped, and with ``repair`` the file is rewritten without it (atomically). A bad line
    elsewhere, or an id seen twice, raises ValueError naming the file and line. ``path``: local
    or gs://."""
    if not epath.Path(path).exists():
        return []
    lines = epath.Path(path).read_bytes().splitlines(keepends=True)
    entries, ids = [], set()
    for lineno, raw in enumerate(lines, start=1):
        last = lineno == len(lines)
        try:
            entry = json.loads(raw) if raw.endswith(b"\n") or not last else None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            if not last:
                raise ValueError(f"{path}, line {lineno}: not a pool entry ({e})") from None
            entry = None
        if entry is None:  # the torn last line
            if repair:
                files.write_bytes(path, b"".join(lines[: lineno - 1]))
            break
        if not isinstance(entry, dict) or "id" not in entry or "candidates" not in entry:
            raise ValueError(f"{path}, line {lineno}: expected an object with id and candidates")
        if entry["id"] in ids:
            raise ValueError(f"{path}, line {lineno}: question id {entry['id']!r} seen twice")
        ids.add(entry["id"])
        entries.append(entry)
    return entries


def meta_path(out_path: str) -> str:
    """Where the settings of pool ``out_path`` are kept: ``<out_path stem>.meta.json``."""
    return os.path.splitext(out_path)[0] + ".meta.json"


def _check_meta(out_path: str, meta: dict, has_entries: bool) -> bool:
    """The pool's settings (and the weights' fingerprints) live beside it; resuming its entries
    with others is an error. A stored meta beside no entries describes no sampled data (a run
    that failed or was killed before its first entry): it is replaced, not compared. -> whether
    ``meta`` is to be written: for no entries (with the first), or for entries under no meta
    or a meta without some of its keys (from an older version)."""
    path = meta_path(out_path)
    if not has_entries or not epath.Path(path).exists():
        return True
    old = json.loads(epath.Path(path).read_text(encoding="utf-8"))
    meta = json.loads(json.dumps(meta))
    for key in sorted(set(old) | set(meta)):
        if key in old and old[key] != meta.get(key):
            raise ValueError(
                f"{out_path} was sampled with {key}={old[key]!r}, now "
                f"{meta.get(key)!r}: use another output directory to sample afresh"
            )
    return not set(meta) <= set(old)


def _write_meta(out_path: str, meta: dict) -> None:
    files.write_text(meta_path(out_path), json.dumps(meta, indent=1))


def encode_question(record: dict, tokenizer, chat_template: bool = True) -> list[int]:
    """Prompt ids as `sample` makes them: the chat template over the record's messages (or its
    prompt as the user message), else the plain prompt with the tokenizer's special tokens."""
    if chat_template and tokenizer.chat_template is not None:
        messages = record.get("messages")
        messages = json.loads(messages) if isinstance(messages, str) else messages
        messages = messages or [{"role": "user", "content": record["prompt"]}]
        return tokenizer.encode_chat(messages, add_generation_prompt=True)
    return tokenizer.encode(record["prompt"], add_special_tokens=True)


def _prompts(records, tokenizer, chat_template, max_len, max_new) -> list[list[int]]:
    prompts = []
    for i, rec in enumerate(records):
        ids = encode_question(rec, tokenizer, chat_template)
        if not ids:
            raise ValueError(f"question {rec['id']!r} (index {i}): empty prompt")
        if len(ids) + max_new > max_len:
            raise ValueError(
                f"question {rec['id']!r} (index {i}): the prompt has {len(ids)} tokens; with "
                f"max_new_tokens={max_new} that exceeds the model's max_len={max_len} "
                "(lower max_new_tokens or leave the question out)"
            )
        prompts.append(ids)
    return prompts


def sample_pool(
    model,
    tokenizer,
    records: list[dict],
    *,
    samples: int,
    sampling,
    step,
    out_path: str,
    engine=None,
    seed: int = 0,
    progress: bool = True,
    chat_template: bool = True,
    extra_heads: dict | None = None,
) -> list[dict]:
    """Samples ``samples`` candidates per question into ``out_path`` (resumable) and returns the
    pool entries of ``records``, in order.

    ``extra_heads`` ({pool path: SPRM head}): other heads on the same backbone (an ablation) get
    pools of the same candidates, scored on the step features the sampler kept (no second
    sampling, no second forward); each pool file resumes on its own.

    Every question still to sample goes into one queue of the continuous-batching engine
    (sample/engine.py; ``engine``: its `EngineConfig`, slots, page size, pool). Question i
    samples with seed ``question_seed(seed, i)``, and each candidate's draws depend only on it
    and its index, never on the engine's schedule; a question's entry is appended (and
    flushed) as soon as it and every question before it are done, so the file's lines are in
    question order. A run resumed after a kill samples the questions not in the file (by id;
    a torn last line is dropped first) and reproduces the uninterrupted run's file. The
    sampling settings are kept in ``<out_path stem>.meta.json`` and must match on resume; it is
    written with the first entry (a meta beside no entries binds nothing), and everything,
    every prompt's length included, is checked before anything is written.
    """
    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")
    ids = [str(r["id"]) for r in records]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise ValueError(f"question id {dup!r} occurs more than once in the benchmark")
    heads = {out_path: None, **(extra_heads or {})}
    for path, head in (extra_heads or {}).items():
        width = getattr(getattr(head, "fc1", None), "kernel", None)
        if width is None or width.shape[0] != model.cfg.d_model:
            raise ValueError(
                f"extra head for {path}: expected an SPRM head over d_model={model.cfg.d_model} "
                f"features, got {type(head).__name__}"
                + (f" with fc1 kernel {tuple(width.shape)}" if width is not None else "")
            )
    prompts = _prompts(records, tokenizer, chat_template, model.cfg.max_len,
                       sampling.max_new_tokens)  # fmt: skip
    meta = {
        "samples": samples, "seed": seed, "chat_template": chat_template,
        "sampling": dataclasses.asdict(sampling), "step": dataclasses.asdict(step),
    }  # fmt: skip
    # Which weights sampled the candidates (and which head scored them), so that a pool is
    # never resumed with another checkpoint's candidates.
    meta["policy"] = params_fingerprint(model)
    metas = {path: meta if head is None else {**meta, "head": params_fingerprint(head)}
             for path, head in heads.items()}  # fmt: skip
    # Everything is checked before anything is written; a pool's meta is written with its
    # first entry, so a run that samples nothing leaves nothing behind.
    stale = {}  # pool path -> whether its meta is to be written (before any new entry)
    for path in heads:
        entries = read_pool(path)
        stale[path] = _check_meta(path, metas[path], has_entries=bool(entries))
        _check_resumed(path, {e["id"]: e for e in entries}, records, ids, samples)
    done = {}  # pool path -> {question id: entry}
    for path in heads:
        done[path] = {e["id"]: e for e in read_pool(path, repair=True)}  # drops a torn line
        if done[path] and stale[path]:  # entries kept: their meta is brought up to date now
            _write_meta(path, metas[path])
            stale[path] = False
    todo = [i for i in range(len(records)) if any(ids[i] not in d for d in done.values())]
    # Entries are appended, flushed and synced one by one (a kill tears at most the last); a
    # gs:// pool is rewritten whole at most every POOL_FLUSH_SECS (files.AppendLog).
    logs = {path: files.AppendLog(path, flush_secs=POOL_FLUSH_SECS, fsync=True) for path in heads}

    def finished(q: int, cands) -> None:
        """Question todo[q] is done (called in order): its entry goes to every pool lacking it."""
        i = todo[q]
        base = _entry(records[i], i, question_seed(seed, i), cands, 0, tokenizer)
        for path, head in heads.items():
            if ids[i] in done[path]:
                continue
            entry = base if head is None else _rescored(base, cands, 0, _head_scores(head, cands))
            done[path][ids[i]] = entry
            if stale[path]:
                _write_meta(path, metas[path])
                stale[path] = False
            logs[path].append(json.dumps(entry, ensure_ascii=False) + "\n")

    try:
        if todo:
            paged_engine.generate(
                model, [prompts[i] for i in todo], k=samples, params=sampling, step=step,
                seeds=[question_seed(seed, i) for i in todo], engine=engine,
                keep_features=len(heads) > 1, on_question=finished, progress=progress,
            )  # fmt: skip
    finally:
        for log in logs.values():
            log.close()
    return [done[out_path][i] for i in ids]


def _check_resumed(path, done, records, ids, samples) -> None:
    for i, rec in enumerate(records):
        e = done.get(ids[i])
        if e is not None and (e["answer"] != rec["answer"] or len(e["candidates"]) != samples):
            raise ValueError(
                f"{path}: question {ids[i]!r} holds {len(e['candidates'])} candidates for "
                f"answer {e['answer']!r}, expected {samples} for {rec['answer']!r} (another "
                "benchmark or sample count): use another output directory"
            )


def _head_scores(head, cands) -> np.ndarray:
    """sigmoid(head(feature)) at every recorded step slot: [B, k, S] (as the sampler's own)."""
    return np.asarray(jax.nn.sigmoid(head(cands.step_features)))


def _rescored(entry: dict, cands, row: int, step_scores: np.ndarray) -> dict:
    """A copy of a pool line with each candidate's step scores taken from ``step_scores``."""
    candidates = [
        {**c, "step_scores": [float(x) for x in step_scores[row, j][cands.step_mask[row, j]]]}
        for j, c in enumerate(entry["candidates"])
    ]
    return {**entry, "candidates": candidates}


def _entry(record, index, seed, cands, row, tokenizer) -> dict:
    """One question's pool line, row ``row`` of the sampler's output."""
    out = []
    for j in range(cands.tokens.shape[1]):
        n = int(cands.length[row, j])
        text = tokenizer.decode(cands.tokens[row, j, :n].tolist())
        answer = extract_final_answer(text)
        correct, how = grade_detail(answer, record["answer"])
        scores = cands.step_scores[row, j][cands.step_mask[row, j]]
        out.append({
            "text": text, "answer": answer, "correct": bool(correct), "grade": how,
            "step_scores": [float(s) for s in scores], "tokens": n,
            "finish": FINISH_REASONS[int(cands.finish[row, j])],
        })  # fmt: skip
    return {"id": str(record["id"]), "index": index, "prompt": record["prompt"],
            "answer": record["answer"], "seed": seed, "candidates": out}  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Beam search (one selection per question)
# ---------------------------------------------------------------------------------------------


def beam_split(k: int) -> tuple[int, int]:
    """(beam_width, expansions) with width x expansions = k: 4 expansions per kept beam (the
    SearchConfig default; k=8 -> 2x4, k=32 -> 8x4) when 4 divides k, else one beam x k."""
    return (k // 4, 4) if k >= 4 and k % 4 == 0 else (1, k)


def beam_eval(
    model, tokenizer, records: list[dict], *, k: int, sampling, step, engine=None,
    seed: int = 0, progress: bool = True, chat_template: bool = True, mesh=None,
) -> list[dict]:  # fmt: skip
    """SPRM-guided step-level beam search (``search.run``, strategy "beam", ``beam_split(k)``)
    per question, every question in one queue of the engine (``engine``: its EngineConfig),
    with ``sample_pool``'s seeds. -> per question {"id", "index", "answer", "correct",
    "selected": {...}, "tokens"}; "tokens" sums the lengths of the k final beams (a shared
    prefix counts once per beam)."""
    width, expansions = beam_split(k)
    config = search.SearchConfig(strategy="beam", k=k, beam_width=width, expansions=expansions)
    prompts = _prompts(records, tokenizer, chat_template, model.cfg.max_len,
                       sampling.max_new_tokens)  # fmt: skip
    res = search.run(
        model, prompts, search=config, params=sampling, step=step, tokenizer=tokenizer,
        seeds=[question_seed(seed, i) for i in range(len(records))], mesh=mesh, engine=engine,
        progress=progress,
    )  # fmt: skip
    out = []
    for i, record in enumerate(records):
        j = int(res.selected[i])
        correct, how = grade_detail(res.answers[i][j], record["answer"])
        selected = {"text": res.texts[i][j], "answer": res.answers[i][j],
                    "score": float(res.scores[i, j]), "grade": how,
                    "tokens": int(res.candidates.length[i, j])}  # fmt: skip
        out.append({"id": str(record["id"]), "index": i, "answer": record["answer"],
                    "correct": bool(correct), "selected": selected,
                    "tokens": int(res.candidates.length[i].sum())})  # fmt: skip
    return out


# ---------------------------------------------------------------------------------------------
# evaluate: checkpoint x benchmark -> pool -> metrics.json
# ---------------------------------------------------------------------------------------------


def targets(modes=(), ks=()) -> dict[str, int]:
    """{label: k}: each mode (low/medium/high = 2/8/32), then each explicit k as "k=K"."""
    out = {}
    for m in modes:
        if m not in MODES:
            raise ValueError(f"mode: expected one of {tuple(MODES)}, got {m!r}")
        out[m] = MODES[m]
    for k in ks:
        if not isinstance(k, int) or k < 1:
            raise ValueError(f"k: expected an integer >= 1, got {k!r}")
        out[f"k={k}"] = k
    if not out:
        raise ValueError("nothing to evaluate: give at least one mode or k")
    return out


def evaluate(
    ckpt: str,
    benchmark: str,
    *,
    modes=("low", "medium", "high"),
    ks=(),
    samples: int | None = None,
    strategy: str = "best_of_k",
    out_dir: str,
    sampling=None,
    step_ids=None,
    engine=None,
    seed: int = 0,
    limit: int | None = None,
    chat_template: bool = True,
    progress: bool = True,
    mesh=None,
    groups: str = "per_question",
) -> dict:
    """Test-time scaling of checkpoint ``ckpt`` on ``benchmark`` (``read_records`` formats).

    Pool strategies (best_of_k, vote, weighted_vote): ``samples`` (M) candidates per question
    into ``out_dir/candidates.jsonl`` (resumable), then per mode/k: pass@1 by the strategy's
    method (``STRATEGY_METHOD``) over floor(M/k) disjoint groups, maj@k (vote) and pass@k
    (oracle), with 95% intervals and tokens per question; every method at every k goes under
    "pool". Beam: ``beam_eval`` per k (``out_dir/beam_k{k}.jsonl``), pass@1 = the searched
    answer's accuracy. ``sampling``: a SamplingParams (default: docs/method.md section 5,
    temperature 0.6, top-p 0.95, repetition penalty 1.05, 32768 new tokens); empty stop_ids
    become the tokenizer's EOS ids. ``step_ids``: step token ids (default: the id of ".\n\n").
    ``engine``: the sampling engine's settings (`sample.engine.EngineConfig`). ``limit``: the
    first N questions. ``groups``: how many groups of k each question counts when candidate
    counts differ (``metrics.GROUP_COUNTS``; "common" is the released metric). Writes
    ``out_dir/metrics.json`` (temp + rename) and returns the same dict. Bad arguments raise
    ValueError before anything is loaded.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy: expected one of {STRATEGIES}, got {strategy!r}")
    if groups not in GROUP_COUNTS:
        raise ValueError(f"groups: expected one of {GROUP_COUNTS}, got {groups!r}")
    want = targets(modes, ks)
    if strategy != "beam":
        label, need = max(want.items(), key=lambda kv: kv[1])
        if samples is None or samples < need:
            raise ValueError(
                f"samples={samples} is fewer than the largest k={need} ({label}): sample at "
                f"least {need} candidates per question"
            )
    if limit is not None and limit < 1:
        raise ValueError(f"limit: expected >= 1 questions, got {limit}")
    check_checkpoint_dir(ckpt, tokenizer=True)
    records = read_records(benchmark)[:limit]
    if not records:
        raise ValueError(f"{benchmark}: no questions")
    if sampling is None:
        sampling = SamplingParams(temperature=0.6, top_p=0.95, repetition_penalty=1.05,
                                  max_new_tokens=32768)  # fmt: skip
    # Every prompt fits the model's budget: checked before the weights are read.
    _prompts(records, load_tokenizer(os.path.join(ckpt, HF_FILES_DIR)), chat_template,
             read_checkpoint_meta(ckpt)[0].max_len, sampling.max_new_tokens)  # fmt: skip
    model, tokenizer, step = load_policy(ckpt, mesh=mesh, step_ids=step_ids)
    if not sampling.stop_ids:
        sampling = dataclasses.replace(sampling, stop_ids=tuple(tokenizer.eos_ids))
    common = dict(sampling=sampling, step=step, seed=seed, progress=progress,
                  chat_template=chat_template)  # fmt: skip
    report = {
        "ckpt": os.path.abspath(ckpt), "benchmark": os.path.abspath(benchmark),
        "n_questions": len(records), "strategy": strategy, "seed": seed,
        "samples": samples if strategy != "beam" else None, "groups": groups,
        "sampling": dataclasses.asdict(sampling), "modes": {},
    }  # fmt: skip
    if strategy == "beam":
        for label, k in want.items():
            entries = beam_eval(model, tokenizer, records, k=k, engine=engine, mesh=mesh,
                                **common)  # fmt: skip
            # Written only now: a failed run leaves nothing.
            lines = "".join(json.dumps(e, ensure_ascii=False) + "\n" for e in entries)
            files.write_text(os.path.join(out_dir, f"beam_k{k}.jsonl"), lines)
            width, expansions = beam_split(k)
            report["modes"][label] = {
                "k": k, "selection": f"beam {width}x{expansions}",
                "pass@1": summarize([e["correct"] for e in entries]),
                "tokens_per_question": float(np.mean([e["tokens"] for e in entries])),
            }  # fmt: skip
    else:
        out_path = os.path.join(out_dir, "candidates.jsonl")
        pool = sample_pool(model, tokenizer, records, samples=samples, out_path=out_path,
                           engine=engine, **common)  # fmt: skip
        metrics = pool_metrics(pool, sorted(set(want.values())), groups=groups)
        method = STRATEGY_METHOD[strategy]
        for label, k in want.items():
            m = metrics[k]["methods"]
            report["modes"][label] = {
                "k": k, "selection": method, "pass@1": m[method], "maj@k": m["vote"],
                "pass@k": m["oracle"], "tokens_per_question": metrics[k]["tokens_per_question"],
            }  # fmt: skip
        report["pool"] = {str(k): v for k, v in metrics.items()}
    files.write_text(os.path.join(out_dir, "metrics.json"), json.dumps(report, indent=2))
    return report
