"""Reading and writing HF safetensors checkpoints tensor by tensor, with the numpy API (no torch).

Reading opens the file for each tensor and closes it again, so the memory map (whose touched
pages count as resident memory) never grows to the whole checkpoint. Writing plans the shards up
front (every shape is known from the config), writes each file's header first and then streams
the tensors into it one at a time; shards are named as transformers names them.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Callable

import ml_dtypes
import numpy as np
from safetensors import safe_open

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
NOT_WEIGHTS = ("score_module.safetensors",)

DTYPE_ALIASES = {
    "bf16": "bfloat16",
    "bfloat16": "bfloat16",
    "fp32": "float32",
    "float32": "float32",
    "fp16": "float16",
    "float16": "float16",
}


def canonical_dtype(name: str, *, what: str = "--dtype") -> str:
    """'bf16' | 'fp32' | 'fp16' (or the long names) -> 'bfloat16' | 'float32' | 'float16'."""
    try:
        return DTYPE_ALIASES[str(name).lower()]
    except KeyError:
        raise ValueError(f"{what}: expected one of bf16, fp32, fp16, got {name!r}") from None


def np_dtype(name: str) -> np.dtype:
    name = canonical_dtype(name)
    return np.dtype(ml_dtypes.bfloat16) if name == "bfloat16" else np.dtype(name)


class SafetensorsReader:
    """All tensors of an HF checkpoint directory (single file, index + shards, or loose shards)."""

    def __init__(self, hf_dir: str):
        self.hf_dir = hf_dir
        self.file_of: dict[str, str] = {}
        index = os.path.join(hf_dir, INDEX_FILE)
        if os.path.exists(index):
            try:
                with open(index) as f:
                    weight_map = json.load(f)["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ValueError(f"{index}: not a safetensors index ({e!r})") from None
            for name, fname in weight_map.items():
                self.file_of[name] = os.path.join(hf_dir, fname)
            for path in sorted(set(self.file_of.values())):
                if not os.path.exists(path):
                    raise ValueError(f"{index}: names {os.path.basename(path)}, which is missing")
        else:
            files = sorted(
                f for f in os.listdir(hf_dir) if f.endswith(".safetensors") and f not in NOT_WEIGHTS
            )
            if not files:
                raise ValueError(
                    f"{hf_dir}: no weights found (expected {SINGLE_FILE} or {INDEX_FILE} + shards)"
                )
            for fname in files:
                path = os.path.join(hf_dir, fname)
                with _open(path) as f:
                    for name in f.keys():
                        self.file_of[name] = path
        self._meta: dict[str, tuple[tuple[int, ...], str]] = {}
        for path in sorted(set(self.file_of.values())):
            with _open(path) as f:
                for name in f.keys():
                    sl = f.get_slice(name)
                    self._meta[name] = (tuple(sl.get_shape()), sl.get_dtype())

    def names(self) -> list[str]:
        return list(self.file_of)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._meta[name][0]

    def dtype(self, name: str) -> str:
        """The safetensors dtype string: 'BF16', 'F16', 'F32', ..."""
        return self._meta[name][1]

    def read(self, name: str) -> np.ndarray:
        path = self.file_of[name]
        if name not in self._meta:
            raise ValueError(f"{path}: the index names tensor {name!r}, but the file lacks it")
        with _open(path) as f:
            return f.get_tensor(name)


def _open(path: str):
    try:
        return safe_open(path, framework="np")
    except Exception as e:  # safetensors raises its own error types for corrupt headers
        raise ValueError(f"{path}: cannot read as safetensors ({e})") from None


TensorSpec = tuple[str, tuple[int, ...], np.dtype]  # (name, shape, dtype)
_ST_DTYPES = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}


def _nbytes(spec: TensorSpec) -> int:
    return math.prod(spec[1]) * spec[2].itemsize


def plan_shards(specs: list[TensorSpec], max_shard_bytes: int) -> list[list[TensorSpec]]:
    """Splits tensors, in order, into shards of at most `max_shard_bytes` (a bigger tensor gets a
    shard of its own), as transformers' save_pretrained does."""
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for spec in specs:
        if shards[-1] and size + _nbytes(spec) > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += _nbytes(spec)
    return shards


def write_streaming(path: str, specs: list[TensorSpec], produce: Callable[[str], np.ndarray]):
    """Writes one safetensors file whose header is known up front, producing one tensor at a time,
    so that only one tensor is ever held in memory for the file."""
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape, dtype in specs:
        n = _nbytes((name, shape, dtype))
        header[name] = {
            "dtype": _ST_DTYPES[np.dtype(dtype).name],
            "shape": list(shape),
            "data_offsets": [offset, offset + n],
        }
        offset += n
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data section starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for name, shape, dtype in specs:
            array = produce(name)
            if array.shape != tuple(shape):
                raise ValueError(f"{path}: tensor {name} has shape {array.shape}, planned {shape}")
            _write_rows(f, array, np.dtype(dtype))


def _write_rows(f, array: np.ndarray, dtype: np.dtype, chunk_bytes: int = 8 << 20) -> None:
    """Writes `array` (maybe a transposed view) row block by row block in C order, so that the
    contiguous, cast copy never exceeds `chunk_bytes` however large the tensor."""
    if array.ndim == 0:
        f.write(np.ascontiguousarray(array, dtype=dtype).tobytes())
        return
    row_bytes = max(1, array[:1].size * dtype.itemsize)
    rows = max(1, chunk_bytes // row_bytes)
    for start in range(0, array.shape[0], rows):
        block = np.ascontiguousarray(array[start : start + rows], dtype=dtype)
        f.write(memoryview(block.reshape(-1).view(np.uint8)))


def write_sharded(
    out_dir: str,
    specs: list[TensorSpec],
    produce: Callable[[str], np.ndarray],
    max_shard_bytes: int,
    progress: Callable | None = None,
) -> list[str]:
    """Writes `specs` as model.safetensors, or as model-0000i-of-0000N.safetensors shards plus
    model.safetensors.index.json; returns the file names."""
    shards = plan_shards(specs, max_shard_bytes)
    n = len(shards)
    names = (
        [SINGLE_FILE] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    )
    wrap = progress or (lambda it, **_: it)
    for fname, shard in wrap(list(zip(names, shards, strict=True)), unit="file"):
        write_streaming(os.path.join(out_dir, fname), shard, produce)
    if n > 1:
        weight_map = {
            s[0]: fname for fname, shard in zip(names, shards, strict=True) for s in shard
        }
        total = sum(_nbytes(s) for s in specs)
        with open(os.path.join(out_dir, INDEX_FILE), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    return names
