"""What a train run needs before its first step: data, tokenizer, model config and params.

`prepare(config, workdir, mesh)` builds the dataset through the tfds builders (into
WORKDIR/data), loads or trains the tokenizer (WORKDIR/tokenizer for from-scratch models), settles
the ModelConfig (from the init checkpoint, else the config with the tokenizer's vocabulary and
special ids) and returns a `RunContext`. Everything here is deterministic in the config, so a
resumed run rebuilds the same context.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from etils import epath
from flax import nnx
from jax.experimental import multihost_utils

from metastone_jax import files
from metastone_jax.checkpoint import (
    HF_FILES_DIR,
    config_to_json,
    load_params_checkpoint,
    read_checkpoint_meta,
    write_policy,
)
from metastone_jax.config import ModelConfig, model_config_from_dict
from metastone_jax.data import builders, pipeline, synthetic
from metastone_jax.data.spm_train import train_sentencepiece
from metastone_jax.data.tokenizer import load_tokenizer
from metastone_jax.model import abstract_model, create_model
from metastone_jax.sample.processors import SamplingParams
from metastone_jax.sprm.steps import StepTokens
from metastone_jax.train.rollout import SavedRollouts, split_micro
from metastone_jax.train.run_config import TrainConfig
from metastone_jax.train.state import pure_params

TOKENIZER_DIR = "tokenizer"
DATA_DIR = "data"
EXPORT_DIR = "export"
# Non-shape fields a run may change relative to its init checkpoint (param_dtype: a bf16
# checkpoint is restored, cast exactly, into fp32 master weights).
RUNTIME_FIELDS = ("remat", "scan_layers", "attention", "compute_dtype", "param_dtype")


@dataclasses.dataclass
class RunContext:
    model_cfg: ModelConfig
    model_cfg_json: dict
    graphdef: Any
    abstract_model: Any
    abstract_params: dict
    init_params: Callable[[], dict]
    tokenizer: Any
    tokenizer_dir: str
    iterator: Any  # pipeline.BatchIterator, or rollout.SavedRollouts for a head-only SPR run
    step_tokens: StepTokens | None  # for the SPR loss (None when the run does not use it)
    sampler_step: StepTokens
    sampling: SamplingParams
    pad_id: int
    prompt_batch: Callable[[list[dict]], tuple[list[list[int]], list[str]]]
    workdir: str  # every file of the run (a local path or gs://; metastone_jax/files.py)


def _source(config: TrainConfig, workdir: str):
    """The training records. With several processes, process 0 builds the dataset first and
    the others then reuse it (on a shared disk) or build the same one (on their own disks):
    two builders writing one directory at once would corrupt it."""
    if jax.process_count() == 1:
        return _build_source(config, workdir)
    source = _build_source(config, workdir) if jax.process_index() == 0 else None
    multihost_utils.sync_global_devices("metastone-jax: dataset built")
    return source if source is not None else _build_source(config, workdir)


def _build_source(config: TrainConfig, workdir: str):
    data_dir = data_cache_dir(workdir)
    src = config.data.source
    if src == "synthetic":
        n = int(config.data.synthetic_size)
        splits = builders.prepare_synthetic(
            functools.partial(synthetic.make_examples, **dataclasses.asdict(config.data.task)),
            name="arithmetic",
            splits={"train": n, "test": max(n // 8, 1)},
            seed=int(config.seed),
            data_dir=data_dir,
        )
        return splits["train"]
    if not os.path.isfile(src):
        raise ValueError(f"config.data.source: {src!r} is neither 'synthetic' nor a file")
    if config.data.unlearned_slips:
        raise ValueError(
            "config.data.unlearned_slips marks the synthetic task's reflective slips; "
            f"config.data.source is {src!r}, not 'synthetic'"
        )
    return builders.prepare_math_file(src, data_dir)


def data_cache_dir(workdir: str) -> str:
    """The tfds dataset cache: WORKDIR/data, or for a gs:// workdir a cache on this machine
    (~/.cache/metastone-jax/datasets, or $XDG_CACHE_HOME's): the builds are named by a hash of
    their content (data/builders.py), so any worker rebuilds the same one, and tfds writes
    local files."""
    if not files.is_remote(workdir):
        return os.path.join(workdir, DATA_DIR)
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(cache, "metastone-jax", "datasets")


def _load_tokenizer(path: str) -> tuple[Any, str]:
    """(tokenizer, a local directory of its files): a gs:// one is read from a local copy."""
    local = files.local_copy(path)
    return load_tokenizer(local), local


def _tokenizer(config: TrainConfig, workdir: str, source) -> tuple[Any, str]:
    if config.tokenizer.path:
        return _load_tokenizer(config.tokenizer.path)
    if config.init_ckpt:
        return _load_tokenizer(os.path.join(config.init_ckpt, HF_FILES_DIR))
    path = os.path.join(workdir, TOKENIZER_DIR)
    if epath.Path(path).is_dir():
        return _load_tokenizer(path)
    if jax.process_count() > 1:
        raise ValueError(
            "multi-process runs need a tokenizer: set config.tokenizer.path (train one with a "
            "single-process run first)"
        )
    texts = (source[i]["prompt"] + "\n" + source[i]["solution"] for i in range(len(source)))
    tok = train_sentencepiece(
        texts,
        path,
        vocab_size=int(config.tokenizer.vocab_size),
        chat_template=config.tokenizer.chat_template or None,
    )
    return tok, files.local_copy(path)  # a gs:// one was read from this copy already


def _model_config(config: TrainConfig, tok) -> ModelConfig:
    if config.init_ckpt:
        cfg, _ = read_checkpoint_meta(config.init_ckpt)
        return cfg.replace(**{f: config.model[f] for f in RUNTIME_FIELDS})
    values = dict(config.model)
    vocab = tok.vocab_size
    if values.get("vocab_size") is None:
        values["vocab_size"] = -(-vocab // 64) * 64
    elif values["vocab_size"] < vocab:
        raise ValueError(
            f"config.model.vocab_size={values['vocab_size']} < the tokenizer's {vocab} tokens"
        )
    eos = tok.eos_ids
    values.update(
        bos_token_id=tok.bos_id,
        eos_token_id=(eos[0] if len(eos) == 1 else tuple(eos)) if eos else None,
        pad_token_id=tok.pad_id,
    )
    return model_config_from_dict(values)


def prepare(config: TrainConfig, workdir: str, mesh) -> RunContext:
    """The run's data, tokenizer, model and sampling settings. `workdir` may be gs://...: every
    file the run writes goes there (the tokenizer it trains, metrics, rollouts, checkpoints, the
    export); only the dataset cache stays on this machine (`data_cache_dir`)."""
    if not files.is_remote(workdir):
        os.makedirs(workdir, exist_ok=True)
    source = _source(config, workdir)
    tok, tok_dir = _tokenizer(config, workdir, source)
    cfg = _model_config(config, tok)
    uses_spr = config.kind == "spr" or (config.kind == "grpo" and float(config.spr.coef) > 0)
    if uses_spr and not cfg.sprm_head:
        raise ValueError(f"config.kind={config.kind} trains the SPRM head; the model has none")
    step_tokens = StepTokens.from_tokenizer(tok) if uses_spr else None
    try:
        sampler_step = step_tokens or StepTokens.from_tokenizer(tok)
    except ValueError:
        sampler_step = StepTokens(())  # no step token: rollouts are simply not scored
    model = abstract_model(cfg)
    graphdef, _ = nnx.split(model)

    def init_params() -> dict:
        if config.init_ckpt:
            loaded, _ = load_params_checkpoint(
                config.init_ckpt, mesh=mesh, **{f: config.model[f] for f in RUNTIME_FIELDS}
            )
            return pure_params(loaded)
        return pure_params(create_model(cfg, seed=int(config.seed), mesh=mesh))

    eos = tok.eos_ids
    sampling = SamplingParams(
        temperature=float(config.rl.temperature),
        top_p=float(config.rl.top_p),
        top_k=int(config.rl.top_k),
        max_new_tokens=int(config.rl.max_new_tokens),
        stop_ids=tuple(eos),
    )
    max_prompt = int(config.data.max_prompt_len)
    if config.data.rollouts_dir:
        if config.kind != "spr":
            raise ValueError("config.data.rollouts_dir (saved rollouts) is for kind='spr' runs")
        iterator = SavedRollouts(config.data.rollouts_dir)
    else:
        iterator = pipeline.BatchIterator(
            source, global_batch=int(config.data.batch_size), seed=int(config.seed)
        )
    return RunContext(
        model_cfg=cfg,
        model_cfg_json=config_to_json(cfg),
        graphdef=graphdef,
        abstract_model=model,
        abstract_params=pure_params(model),
        init_params=init_params,
        tokenizer=tok,
        tokenizer_dir=tok_dir,
        iterator=iterator,
        step_tokens=step_tokens,
        sampler_step=sampler_step,
        sampling=sampling,
        pad_id=pipeline.pad_id(tok),
        prompt_batch=lambda recs: pipeline.prompt_batch(recs, tok, max_prompt_len=max_prompt),
        workdir=workdir,
    )


def sft_rows(records: list[dict], ctx: RunContext, config: TrainConfig) -> dict[str, np.ndarray]:
    """SFT rows [A, b, T] (A = config.data.grad_accum micro-batches)."""
    # Reflective traces of the synthetic task: learn the correction, not the deliberate slip.
    unlearned = synthetic.slip_spans if config.data.unlearned_slips else None
    batch = pipeline.sft_batch(
        records, ctx.tokenizer, seq_len=int(config.data.seq_len), unlearned=unlearned
    )
    return split_micro(batch, int(config.data.grad_accum))


def export(state, ctx: RunContext, workdir: str) -> str:
    """WORKDIR/export: a params-only checkpoint + the tokenizer, for `metastone-jax sample`."""
    model = nnx.merge(ctx.graphdef, state.params)
    return write_policy(
        os.path.join(workdir, EXPORT_DIR), nnx.state(model), ctx.model_cfg,
        tokenizer_dir=ctx.tokenizer_dir, meta={"source": workdir},
        extra_json={"train_step.json": {"step": int(state.step)}},
    )  # fmt: skip
