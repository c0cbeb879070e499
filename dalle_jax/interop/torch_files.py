"""Reading and writing PyTorch state-dict files as numpy arrays. Files are always read with `weights_only=True`,
so a file can hold tensors and plain containers only, never code."""
from __future__ import annotations

import os
from typing import Mapping

import numpy as np

TORCH_DTYPES = ("float32", "float16")
INSTALL_HINT = "pip install -e '.[torch]'"


def _torch():
    try:
        import torch
    except ImportError as err:
        raise ImportError(f"Reading and writing PyTorch files needs torch; install it with `{INSTALL_HINT}`.") from err
    return torch


def load_tensors(path: str, *, what: str) -> dict:
    """The object a torch file holds (read with weights_only=True), with tensors left as torch tensors."""
    torch = _torch()
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} file {path!r} does not exist.")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises UnpicklingError, RuntimeError, ... for files it will not load safely
        raise ValueError(f"{path!r} could not be read as a {what} with torch.load(weights_only=True): {err}. It must "
                         "hold tensors in plain dicts only; re-save just its state_dict.") from err


def to_numpy(state: Mapping, *, path: str) -> dict[str, np.ndarray]:
    """A {name: tensor} state dict -> {name: float32 numpy array} (float16/bfloat16 files are widened)."""
    torch = _torch()
    if not isinstance(state, Mapping):
        raise ValueError(f"{path!r} holds a {type(state).__name__}, not a state dict of named tensors.")
    arrays = {}
    for name, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"{path!r}: entry {name!r} is a {type(value).__name__}, not a tensor.")
        if not value.is_floating_point():
            raise ValueError(f"{path!r}: entry {name!r} has dtype {value.dtype}; only float parameters are expected.")
        arrays[name] = value.detach().to(torch.float32).numpy()
    return arrays


def load_state_dict(path: str, *, what: str) -> dict[str, np.ndarray]:
    return to_numpy(load_tensors(path, what=what), path=path)


def save_state_dict(arrays: Mapping[str, np.ndarray], path: str, *, dtype: str = "float32") -> None:
    """Writes {name: array} as a torch state dict of `dtype` tensors (contiguous, one storage each)."""
    torch = _torch()
    if dtype not in TORCH_DTYPES:
        raise ValueError(f"dtype={dtype!r} is not supported for torch files; use one of {TORCH_DTYPES}.")
    target = getattr(torch, dtype)
    state = {name: torch.tensor(np.asarray(a, np.float32)).to(target) for name, a in arrays.items()}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    torch.save(state, path)
