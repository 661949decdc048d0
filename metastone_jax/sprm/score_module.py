"""The released SPRM head file: `score_module.pt` (torch state dict) or `.safetensors`.

Keys are those of torch.nn.Sequential(Linear(D,2D), ReLU, Dropout, Linear(2D,1)): 0.weight [2D,D],
0.bias [2D], 3.weight [1,2D], 3.bias [1]. Torch is imported only to read or write the .pt form
(metastone_jax/optional.py).
"""

from __future__ import annotations

import os
from collections import OrderedDict

import ml_dtypes
import numpy as np
from safetensors.numpy import load_file, save_file

from metastone_jax import optional

PT_FILE = "score_module.pt"
SAFETENSORS_FILE = "score_module.safetensors"
KEYS = ("0.weight", "0.bias", "3.weight", "3.bias")


def _torch(purpose: str):
    try:
        torch = optional.torch()
    except ImportError:
        raise ValueError(
            f"{purpose} needs torch (`pip install torch`), or use {SAFETENSORS_FILE} instead"
        ) from None
    return torch


def find_score_module(hf_dir: str) -> str | None:
    """The SPRM head file in `hf_dir` (.safetensors preferred, no torch needed), or None."""
    for name in (SAFETENSORS_FILE, PT_FILE):
        path = os.path.join(hf_dir, name)
        if os.path.exists(path):
            return path
    return None


def read_score_module(path: str) -> dict[str, np.ndarray]:
    """{key: array} in the file's own dtype (bf16 as ml_dtypes.bfloat16)."""
    if path.endswith(".safetensors"):
        try:
            tensors = load_file(path)
        except Exception as e:
            raise ValueError(f"{path}: cannot read as safetensors ({e})") from None
    else:
        torch = _torch(f"reading {path}")
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise ValueError(f"{path}: cannot read as a torch state dict ({e})") from None
        if not isinstance(sd, dict):
            raise ValueError(f"{path}: expected a state dict, got {type(sd).__name__}")
        tensors = {k: _torch_to_numpy(v, torch) for k, v in sd.items()}
    missing = [k for k in KEYS if k not in tensors]
    unexpected = sorted(set(tensors) - set(KEYS))
    if missing or unexpected:
        raise ValueError(
            f"{path}: expected keys {list(KEYS)}; missing {missing}, unexpected {unexpected}"
        )
    return tensors


def write_score_module(path: str, tensors: dict[str, np.ndarray]) -> None:
    if path.endswith(".safetensors"):
        save_file(
            {k: np.ascontiguousarray(tensors[k]) for k in KEYS}, path, metadata={"format": "pt"}
        )
        return
    torch = _torch(f"writing {path}")
    sd = OrderedDict((k, _numpy_to_torch(tensors[k], torch)) for k in KEYS)
    torch.save(sd, path)


def _torch_to_numpy(t, torch) -> np.ndarray:
    t = t.detach().cpu().contiguous()
    if t.dtype == torch.bfloat16:  # numpy has no bf16: reinterpret the bits
        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


def _numpy_to_torch(a: np.ndarray, torch):
    a = np.ascontiguousarray(a)
    if a.dtype == np.dtype(ml_dtypes.bfloat16):
        return torch.from_numpy(a.view(np.int16).copy()).view(torch.bfloat16)
    return torch.from_numpy(a.copy())
