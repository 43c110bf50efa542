"""Training checkpoints that resume exactly: trainable weights, optimizer, scheduler, RNG states and the data
position, as safetensors + JSON (never pickles), each written to a temporary folder and renamed into place."""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

PREFIX = "step-"


def _split(state: Any, tensors: dict[str, torch.Tensor], path: str = "") -> Any:
    """JSON-able structure with every tensor moved into ``tensors`` under its path."""
    if torch.is_tensor(state):
        tensors[path] = state.detach().cpu().contiguous()
        return {"__tensor__": path}
    if isinstance(state, dict):
        return {"__dict__": [[_split(k, tensors, f"{path}.k{i}"), _split(v, tensors, f"{path}.{i}")] for i, (k, v) in enumerate(state.items())]}
    if isinstance(state, (list, tuple)):
        items = [_split(v, tensors, f"{path}.{i}") for i, v in enumerate(state)]
        return {"__tuple__": items} if isinstance(state, tuple) else items
    if isinstance(state, np.ndarray):
        tensors[path] = torch.from_numpy(state.copy())
        return {"__ndarray__": path}
    return state


def _join(state: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(state, dict):
        if "__tensor__" in state:
            return tensors[state["__tensor__"]]
        if "__ndarray__" in state:
            return tensors[state["__ndarray__"]].numpy()
        if "__tuple__" in state:
            return tuple(_join(v, tensors) for v in state["__tuple__"])
        if "__dict__" in state:
            return {_join(k, tensors): _join(v, tensors) for k, v in state["__dict__"]}
    if isinstance(state, list):
        return [_join(v, tensors) for v in state]
    return state


def write_part(folder: Path, name: str, state: Any) -> None:
    tensors: dict[str, torch.Tensor] = {}
    structure = _split(state, tensors)
    save_file(tensors, folder / f"{name}.safetensors")
    (folder / f"{name}.json").write_text(json.dumps(structure))


def read_part(folder: Path, name: str) -> Any:
    return _join(json.loads((folder / f"{name}.json").read_text()), load_file(folder / f"{name}.safetensors"))


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def stage_checkpoint(directory: str | os.PathLike, step: int, parts: dict[str, Any]) -> None:
    """Write ``parts`` into the staging folder of checkpoint ``step``. Every process stages its own parts
    (rank-specific names for RNG states); the main process publishes once all have written."""
    staging = Path(directory) / f".tmp-{PREFIX}{step:08d}"
    staging.mkdir(parents=True, exist_ok=True)
    for name, state in parts.items():
        write_part(staging, name, state)


def publish_checkpoint(directory: str | os.PathLike, step: int, keep: int) -> Path:
    """Rename the staged checkpoint into place (main process, after every process wrote its part)."""
    directory = Path(directory)
    final, staging = directory / f"{PREFIX}{step:08d}", directory / f".tmp-{PREFIX}{step:08d}"
    (staging / "complete").write_text("ok")
    if final.exists():
        shutil.rmtree(final)
    os.replace(staging, final)
    for old in sorted(complete_checkpoints(directory))[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def complete_checkpoints(directory: str | os.PathLike) -> list[Path]:
    """Complete checkpoints, oldest first (a folder killed mid-write is never renamed into place)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir() if p.name.startswith(PREFIX) and (p / "complete").is_file())


def latest_checkpoint(directory: str | os.PathLike) -> Path | None:
    found = complete_checkpoints(directory)
    return found[-1] if found else None


def clean_staging(directory: str | os.PathLike) -> None:
    """Remove checkpoints that a killed run left half-written."""
    directory = Path(directory)
    if directory.is_dir():
        for stale in directory.glob(f".tmp-{PREFIX}*"):
            shutil.rmtree(stale, ignore_errors=True)
