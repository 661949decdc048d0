"""HF checkpoints (config.json + safetensors [+ score_module]) <-> our sharded parameters.

Reading goes tensor by tensor: each of our parameters is assembled in one host buffer (per-layer
HF tensors stacked on the 'layers' axis), placed straight into its target sharding, and the buffer
is dropped, so host memory holds the placed parameters plus one parameter in flight. Writing
streams tensors into size-capped shards. Both directions are driven by convert/mapping.py.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import sys
from typing import Any

import jax
import numpy as np
from flax import nnx
from tqdm import tqdm

from metastone_jax import checkpoint
from metastone_jax.config import ModelConfig
from metastone_jax.convert import spm_to_hf
from metastone_jax.convert.mapping import (
    BACKBONE_RULES,
    IGNORED_HF_SUFFIXES,
    SPRM_RULES,
    Rule,
    active_rules,
    expected_hf_tensors,
    zero_hf_tensors,
)
from metastone_jax.convert.safetensors_io import (
    SafetensorsReader,
    canonical_dtype,
    np_dtype,
    write_sharded,
)
from metastone_jax.model import abstract_model
from metastone_jax.sharding import placement
from metastone_jax.sprm import score_module
from metastone_jax.sprm.head import SPRMHead

CONFIG_FILE = "config.json"
GENERATION_CONFIG_FILE = "generation_config.json"
# Files carried through a conversion unchanged so that the tokenizer and generation defaults
# keep working on either side.
CARRIED_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    GENERATION_CONFIG_FILE,
    CONFIG_FILE,
)
SAFETENSORS_DTYPES = {"BF16": "bfloat16", "F16": "float16", "F32": "float32"}
DEFAULT_MAX_SHARD_SIZE = "5GB"  # transformers' save_pretrained default


def read_hf_config(hf_dir: str, dtype: str | None = None) -> tuple[dict[str, Any], ModelConfig]:
    """(config.json dict, ModelConfig); param dtype = `dtype` or the checkpoint's (fp16 -> fp32)."""
    if not os.path.isdir(hf_dir):
        raise ValueError(f"{hf_dir}: no such directory")
    path = os.path.join(hf_dir, CONFIG_FILE)
    if not os.path.exists(path):
        raise ValueError(f"{hf_dir}: missing {CONFIG_FILE}")
    try:
        with open(path) as f:
            hf = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    source = hf.get("torch_dtype") or hf.get("dtype") or "float32"
    source = source if source in SAFETENSORS_DTYPES.values() else "float32"
    param_dtype = canonical_dtype(dtype) if dtype else source
    if param_dtype == "float16":
        param_dtype = "float32"  # fp16 params overflow in training; upcasting is exact
    try:
        cfg = ModelConfig.from_hf_config(hf, param_dtype=param_dtype)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{path}: {e}") from None
    return hf, cfg


def _shape_hint(cfg: ModelConfig) -> str:
    return (
        f"hidden_size={cfg.d_model}, num_hidden_layers={cfg.n_layers}, "
        f"num_attention_heads={cfg.n_heads}, num_key_value_heads={cfg.n_kv_heads}, "
        f"head_dim={cfg.head_dim}, intermediate_size={cfg.d_ff}, vocab_size={cfg.vocab_size}"
    )


def _check_tensors(reader: SafetensorsReader, cfg: ModelConfig) -> None:
    """Every tensor the config implies is present with its shape; nothing unexpected is left."""
    config_path = os.path.join(reader.hf_dir, CONFIG_FILE)
    expected = {name: rule for name, rule, _ in expected_hf_tensors(BACKBONE_RULES, cfg)}
    present = set(reader.names())
    missing = [n for n in expected if n not in present]
    if missing:
        raise ValueError(
            f"{reader.hf_dir}: missing tensor(s) {missing[:5]}{' ...' if len(missing) > 5 else ''} "
            f"that {config_path} implies ({_shape_hint(cfg)}, "
            f"tie_word_embeddings={cfg.tie_embeddings}, bias={cfg.qkv_bias})"
        )
    tolerated = {"lm_head.weight"} if cfg.tie_embeddings else set()
    tolerated |= {name for name, _ in zero_hf_tensors(cfg)}  # checked when read
    unexpected = sorted(
        n for n in present - set(expected) - tolerated if not n.endswith(IGNORED_HF_SUFFIXES)
    )
    if unexpected:
        where = reader.file_of[unexpected[0]]
        raise ValueError(
            f"{where}: unexpected tensor(s) {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}"
            f"; {config_path} disagrees with the weights ({_shape_hint(cfg)}, bias={cfg.qkv_bias})"
        )
    for name, want in zero_hf_tensors(cfg):
        if name in present and (reader.shape(name) != want or np.any(reader.read(name) != 0)):
            raise ValueError(
                f"{reader.file_of[name]}: tensor {name} must be zeros of shape {list(want)} "
                f"(this model has no o_proj bias; {config_path} sets attention_bias=true)"
            )
    for name, rule in expected.items():
        want = rule.transform.hf_shape(cfg)
        if reader.shape(name) != want:
            raise ValueError(
                f"{reader.file_of[name]}: tensor {name} has shape {list(reader.shape(name))}, "
                f"expected {list(want)} from {config_path} ({_shape_hint(cfg)})"
            )
        if reader.dtype(name) not in SAFETENSORS_DTYPES:
            raise ValueError(
                f"{reader.file_of[name]}: tensor {name} has dtype {reader.dtype(name)}; "
                f"expected one of {sorted(SAFETENSORS_DTYPES)}"
            )


def _get(tree: dict, path: tuple[str, ...]):
    for key in path:
        tree = tree[key]
    return tree


def _set(tree: dict, path: tuple[str, ...], value) -> None:
    for key in path[:-1]:
        tree = tree[key]
    tree[path[-1]] = value


def _place(rule: Rule, cfg, read, target, sharding) -> jax.Array:
    """Assembles one parameter on the host from HF tensors and places it in its sharding."""
    dtype = np_dtype(str(target.dtype))
    if not rule.per_layer:
        value = np.ascontiguousarray(rule.transform.to_ours(read(rule.hf), cfg), dtype=dtype)
        return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])
    buf = np.empty(target.shape, dtype)  # [L, ...], filled layer by layer
    for i, name in enumerate(rule.hf_names(cfg)):
        buf[i] = rule.transform.to_ours(read(name), cfg)
    return jax.make_array_from_callback(buf.shape, sharding, lambda index: buf[index])


def load_hf_model(
    hf_dir: str,
    *,
    dtype: str | None = None,
    mesh: jax.sharding.Mesh | None = None,
    seed: int = 0,
    progress: bool = True,
):
    """(Transformer, meta) from an HF directory, every parameter placed in its sharding.

    Without `score_module.{safetensors,pt}` beside the weights, the SPRM head is initialised
    from `seed` (as for a policy that has not been trained with the SPR loss yet).
    """
    _, cfg = read_hf_config(hf_dir, dtype)
    reader = SafetensorsReader(hf_dir)
    _check_tensors(reader, cfg)
    first = next(iter(expected_hf_tensors(BACKBONE_RULES, cfg)))[0]
    source_dtype = SAFETENSORS_DTYPES[reader.dtype(first)]

    graphdef, abstract = nnx.split(abstract_model(cfg))
    shardings = placement(abstract, mesh)
    targets = nnx.to_pure_dict(abstract)
    params = jax.tree.map(lambda _: None, targets)

    # Largest first: each parameter's transient host copies then land while little is placed,
    # so the peak stays near the placed total.
    rules = sorted(
        active_rules(BACKBONE_RULES, cfg),
        key=lambda r: -np.prod(_get(targets, r.path).shape) * _get(targets, r.path).dtype.itemsize,
    )
    for rule in tqdm(rules, desc=f"reading {hf_dir}", unit="param", disable=not progress):
        value = _place(rule, cfg, reader.read, _get(targets, rule.path), _get(shardings, rule.path))
        _set(params, rule.path, value)

    score_meta = None
    if cfg.sprm_head:
        path = score_module.find_score_module(hf_dir)
        if path is not None:
            tensors = score_module.read_score_module(path)
            for rule in SPRM_RULES:
                want = rule.transform.hf_shape(cfg)
                if tensors[rule.hf].shape != want:
                    raise ValueError(
                        f"{path}: tensor {rule.hf} has shape {list(tensors[rule.hf].shape)}, "
                        f"expected {list(want)} for hidden_size={cfg.d_model}"
                    )
                value = _place(rule, cfg, tensors.__getitem__, _get(targets, rule.path),
                               _get(shardings, rule.path))  # fmt: skip
                _set(params, rule.path, value)
            score_meta = {"file": os.path.basename(path), "dtype": str(tensors["0.weight"].dtype)}
        else:
            head = nnx.to_pure_dict(nnx.state(SPRMHead(cfg.d_model, rngs=nnx.Rngs(seed))))
            placed = jax.tree.map(jax.device_put, head, shardings["sprm"])
            params["sprm"] = placed

    nnx.replace_by_pure_dict(abstract, params)
    meta = {
        "source": {
            "format": "hf",
            "path": os.path.abspath(hf_dir),
            "dtype": source_dtype,
            "score_module": score_meta,
        }
    }
    return nnx.merge(graphdef, abstract), meta


def hf_to_jax(
    hf_dir: str,
    out: str,
    *,
    dtype: str | None = None,
    mesh: jax.sharding.Mesh | None = None,
    overwrite: bool = False,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """Converts an HF directory into a params checkpoint at `out`; returns the checkpoint meta."""
    checkpoint.check_output_free(out, overwrite)  # before the (long) read
    model, meta = load_hf_model(hf_dir, dtype=dtype, mesh=mesh, seed=seed, progress=progress)
    with checkpoint.atomic_dir(out, overwrite=overwrite) as tmp:
        checkpoint.write_params_checkpoint(tmp, nnx.state(model), model.cfg, meta)
        _carry_files(hf_dir, os.path.join(tmp, checkpoint.HF_FILES_DIR))
    return meta


def _carry_files(src: str, dst: str, skip: tuple[str, ...] = ()) -> None:
    os.makedirs(dst, exist_ok=True)
    for name in CARRIED_FILES:
        if name not in skip and os.path.exists(os.path.join(src, name)):
            shutil.copy2(os.path.join(src, name), os.path.join(dst, name))


def parse_size(size: str | int) -> int:
    """'5GB' | '500MB' | '10KB' | bytes (decimal units, as transformers uses) -> bytes."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?B)?\s*", str(size), re.I)
    if not m:
        raise ValueError(
            f"--max_shard_size: expected e.g. 5GB, 500MB or a byte count, got {size!r}"
        )
    unit = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9}[(m.group(2) or "B").upper()]
    return int(float(m.group(1)) * unit)


def export_hf(
    cfg: ModelConfig,
    params: dict,
    out_dir: str,
    *,
    dtype: str,
    max_shard_size: str | int = DEFAULT_MAX_SHARD_SIZE,
    score_format: str = "pt",
    score_dtype: str = "float32",
    base_config: dict[str, Any] | None = None,
    progress: bool = True,
) -> list[str]:
    """Writes weights, config.json and the SPRM head into the existing `out_dir`. `params` is a
    pure dict of our parameters (numpy or jax arrays), e.g. `nnx.to_pure_dict(nnx.state(m))`."""
    score_files = {
        "pt": [score_module.PT_FILE],
        "safetensors": [score_module.SAFETENSORS_FILE],
        "both": [score_module.PT_FILE, score_module.SAFETENSORS_FILE],
        "none": [],
    }
    if score_format not in score_files:  # checked before any tensor is written
        raise ValueError(
            f"--score_module: expected one of {', '.join(score_files)}, got {score_format!r}"
        )
    dtype = canonical_dtype(dtype)
    host_dtype = np_dtype(dtype)
    # Our parameter for each HF tensor; each one is transformed only when its file is written.
    sources = {
        name: (rule, layer) for name, rule, layer in expected_hf_tensors(BACKBONE_RULES, cfg)
    }
    specs = [
        (name, rule.transform.hf_shape(cfg), host_dtype) for name, (rule, _) in sources.items()
    ]
    zeros = dict(zero_hf_tensors(cfg))
    specs += [(name, shape, host_dtype) for name, shape in zeros.items()]

    def produce(name):  # a view of our parameter; written out in small row blocks
        if name in zeros:
            return np.zeros(zeros[name], host_dtype)
        rule, layer = sources[name]
        value = np.asarray(_get(params, rule.path))
        return rule.transform.to_hf(value if layer is None else value[layer], cfg)

    bar = functools.partial(tqdm, desc=f"writing {out_dir}", disable=not progress)
    files = write_sharded(out_dir, specs, produce, parse_size(max_shard_size), progress=bar)

    hf_config = {k: v for k, v in (base_config or {}).items() if not k.startswith("rope_")}
    hf_config.pop("dtype", None)
    hf_config.update(cfg.to_hf_config())
    hf_config["torch_dtype"] = dtype
    with open(os.path.join(out_dir, CONFIG_FILE), "w") as f:
        json.dump(hf_config, f, indent=2)

    if cfg.sprm_head and score_files[score_format]:
        head = {
            rule.hf: rule.transform.to_hf(np.asarray(_get(params, rule.path)), cfg).astype(
                np_dtype(score_dtype)
            )
            for rule in SPRM_RULES
        }
        for fname in score_files[score_format]:
            score_module.write_score_module(os.path.join(out_dir, fname), head)
            files.append(fname)
    return files


def jax_to_hf(
    ckpt: str,
    out: str,
    *,
    dtype: str | None = None,
    max_shard_size: str | int = DEFAULT_MAX_SHARD_SIZE,
    score_format: str = "pt",
    overwrite: bool = False,
    progress: bool = True,
) -> list[str]:
    """Exports a params checkpoint as an HF directory that `from_pretrained` loads as-is.

    The dtype defaults to that of the HF checkpoint the params came from (else the param dtype);
    tokenizer and generation files carried in the checkpoint are copied back. A SentencePiece
    tokenizer without tokenizer.json (a model trained from scratch) gets one with the same ids
    (convert/spm_to_hf.py), and its model is written as LlamaForCausalLM (see below)."""
    checkpoint.check_output_free(out, overwrite)
    carried = os.path.join(ckpt, checkpoint.HF_FILES_DIR)
    tokenizer_files = _sentencepiece_to_hf(carried)  # before the (long) read of the weights
    cfg, params, meta = checkpoint.load_params_numpy(ckpt)
    # An HF conversion records its source as a dict; a `train` export records its workdir.
    source = meta.get("source")
    source = source if isinstance(source, dict) else {}
    dtype = canonical_dtype(dtype or source.get("dtype") or cfg.param_dtype)
    score_dtype = (source.get("score_module") or {}).get("dtype") or "float32"
    if tokenizer_files and cfg.arch == "qwen2":
        # transformers 5 gives every qwen2 checkpoint its byte-level Qwen2Tokenizer, rebuilt
        # from tokenizer.json's vocabulary alone (MODELS_WITH_INCORRECT_HUB_TOKENIZER_CLASS in
        # tokenization_auto.py), which cannot reproduce SentencePiece's ids. The same network
        # as a Llama (zero o_proj biases) keeps tokenizer.json as written.
        cfg = cfg.replace(arch="llama")
    base_config = None
    if os.path.exists(os.path.join(carried, CONFIG_FILE)):
        with open(os.path.join(carried, CONFIG_FILE)) as f:
            base_config = json.load(f)
    with checkpoint.atomic_dir(out, overwrite=overwrite) as tmp:
        files = export_hf(
            cfg,
            params,
            tmp,
            dtype=dtype,
            max_shard_size=max_shard_size,
            score_format=score_format,
            score_dtype=score_dtype,
            base_config=base_config,
            progress=progress,
        )
        if os.path.isdir(carried):  # config.json was rewritten by export_hf
            _carry_files(carried, tmp, skip=(CONFIG_FILE,))
        for name, text in tokenizer_files.items():  # replaces the carried tokenizer_config.json
            with open(os.path.join(tmp, name), "w", encoding="utf-8") as f:
                f.write(text)
        files += list(tokenizer_files)
        if not os.path.exists(os.path.join(tmp, GENERATION_CONFIG_FILE)):
            _write_generation_config(tmp, cfg)
    return files


def _sentencepiece_to_hf(carried: str) -> dict[str, str]:
    """tokenizer.json and its config files for a SentencePiece tokenizer that lacks them; none
    when there is nothing to convert or the model is not one tokenizer.json reproduces (then
    tokenizer.model is carried as it is, as before, and transformers builds its own)."""
    if not spm_to_hf.needs_conversion(carried):
        return {}
    try:
        return spm_to_hf.hf_tokenizer_files(carried)
    except spm_to_hf.NotConvertible as e:
        print(
            f"metastone-jax convert: warning: {e}; copying it without a tokenizer.json",
            file=sys.stderr,
        )
        return {}


def _write_generation_config(out_dir: str, cfg: ModelConfig) -> None:
    eos = list(cfg.eos_token_id) if isinstance(cfg.eos_token_id, tuple) else cfg.eos_token_id
    values = {
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": eos,
        "pad_token_id": cfg.pad_token_id,
    }
    with open(os.path.join(out_dir, GENERATION_CONFIG_FILE), "w") as f:
        json.dump({k: v for k, v in values.items() if v is not None}, f, indent=2)
