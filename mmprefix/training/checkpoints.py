"""Training checkpoints that resume exactly: trainable weights, optimizer, scheduler, RNG states and the data
position, as safetensors + JSON (never pickles), each written to a temporary folder and renamed into place.

Reading one validates everything before anything is applied: each part's JSON and tensors (damaged files,
missing tensors and non-finite values are a ``ValueError`` naming the file), the run state's fields, and the
weights and optimizer state against the shapes of the model being resumed."""

from __future__ import annotations

import json
import os
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file

from ..core import typed
from ..core.files import load_finite, sync_folder

PREFIX = "step-"
SET_ASIDE = "set-aside-"  # OUTPUT_DIR/set-aside-<when>/: an earlier run's checkpoints, never deleted by a run


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


def _join(state: Any, tensors: dict[str, torch.Tensor], source: str) -> Any:
    if isinstance(state, dict):
        for marker in ("__tensor__", "__ndarray__"):
            if marker in state:
                if state[marker] not in tensors:
                    raise ValueError(f"{source} refers to tensor {state[marker]!r}, which its .safetensors lacks")
                tensor = tensors[state[marker]]
                return tensor if marker == "__tensor__" else tensor.numpy()
        if "__tuple__" in state:
            return tuple(_join(v, tensors, source) for v in state["__tuple__"])
        if "__dict__" in state:
            pairs = state["__dict__"]
            if not isinstance(pairs, list) or not all(isinstance(p, list) and len(p) == 2 for p in pairs):
                raise ValueError(f"{source}: a __dict__ entry must be a list of [key, value] pairs")
            return {_join(k, tensors, source): _join(v, tensors, source) for k, v in pairs}
        return {k: _join(v, tensors, source) for k, v in state.items()}
    if isinstance(state, list):
        return [_join(v, tensors, source) for v in state]
    return state


def write_part(folder: Path, name: str, state: Any) -> None:
    tensors: dict[str, torch.Tensor] = {}
    structure = _split(state, tensors)
    save_file(tensors, folder / f"{name}.safetensors")
    (folder / f"{name}.json").write_text(json.dumps(structure))


class DamagedCheckpoint(ValueError):
    """A checkpoint that does not read back whole (a part missing, cut short, altered or not finite)."""


class CheckpointMismatch(ValueError):
    """A whole checkpoint that was written for another model, method or number of processes."""


def read_part(folder: Path, name: str) -> Any:
    """One part as written by `write_part`; a damaged or incomplete part is a `DamagedCheckpoint` naming its file."""
    source = folder / f"{name}.json"
    try:
        text = source.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise DamagedCheckpoint(f"{source} is missing: the checkpoint is incomplete") from None
    except UnicodeDecodeError:
        raise DamagedCheckpoint(f"{source} is not UTF-8 text: the checkpoint is damaged") from None
    try:
        structure = json.loads(text)
        return _join(structure, load_finite(folder / f"{name}.safetensors"), str(source))
    except json.JSONDecodeError as err:
        raise DamagedCheckpoint(f"{source} is not valid JSON ({err.msg}, line {err.lineno}): the checkpoint is "
                                "damaged") from None
    except DamagedCheckpoint:
        raise
    except ValueError as err:
        raise DamagedCheckpoint(str(err)) from None


@dataclass
class Position:
    """Where a run stands: its step, where it is in the data, and its best evaluation so far."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    samples: int = 0
    best: dict[str, Any] | None = None


@dataclass
class RunState:
    """Where a run stood when its checkpoint was written."""

    step: int
    epoch: int
    batch_in_epoch: int
    samples: int
    processes: int
    config: dict[str, Any]
    best: dict[str, Any] | None = None
    settings: dict[str, Any] | None = None  # what else defines the run (a recipe's settings), compared on resume

    def __post_init__(self) -> None:
        if min(self.step, self.epoch, self.batch_in_epoch, self.samples) < 0 or self.processes < 1:
            raise ValueError("step, epoch, batch_in_epoch and samples must be >= 0, processes >= 1")


def read_checkpoint(path: Path, parameters: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer,
                    rank: int) -> dict[str, Any]:
    """Every part of checkpoint ``path`` this process needs, checked against the trainable ``parameters`` (by
    name) and ``optimizer`` it is to be loaded into; nothing is applied here."""
    try:
        state = typed.build(RunState, read_part(path, "state"), str(path / "state.json"))
    except typed.FieldError as err:
        raise DamagedCheckpoint(str(err)) from None
    trainable = read_part(path, "trainable")
    source = path / "trainable.safetensors"
    if not isinstance(trainable, dict) or set(trainable) != set(parameters):
        missing = sorted(set(parameters) - set(trainable or {}))[:3]
        extra = sorted(set(trainable or {}) - set(parameters))[:3]
        raise CheckpointMismatch(f"{source} holds other weights than this model trains (missing {missing}, unknown {extra}): "
                         "was it written for another model or method?")
    for name, tensor in trainable.items():
        if not torch.is_tensor(tensor) or tensor.shape != parameters[name].shape:
            got = tuple(tensor.shape) if torch.is_tensor(tensor) else type(tensor).__name__
            raise CheckpointMismatch(f"{source}: {name!r} has shape {got}, this model's is {tuple(parameters[name].shape)} "
                             "(another prefix length or model?)")
    optimizer_state = read_part(path, "optimizer")
    _check_optimizer(optimizer_state, optimizer, path / "optimizer.json")
    parts = {"state": state, "trainable": trainable, "optimizer": optimizer_state,
             "scheduler": read_part(path, "scheduler"), "rng": read_part(path, f"rng-rank{rank}")}
    _check_rng(parts["rng"], path / f"rng-rank{rank}.json")
    if (path / "scaler.json").is_file():
        parts["scaler"] = read_part(path, "scaler")
    return parts


def _check_optimizer(saved: Any, optimizer: torch.optim.Optimizer, source: Path) -> None:
    """The saved optimizer state has this optimizer's groups and, per parameter, tensors of its shape."""
    if not isinstance(saved, dict) or not isinstance(saved.get("param_groups"), list) or not isinstance(saved.get("state"), dict):
        raise DamagedCheckpoint(f"{source} is not an optimizer state (expected state and param_groups)")
    ours = optimizer.param_groups
    theirs = saved["param_groups"]
    if len(theirs) != len(ours) or any(len(g.get("params", [])) != len(o["params"]) for g, o in zip(theirs, ours)):
        raise CheckpointMismatch(f"{source}: {[len(g.get('params', [])) for g in theirs]} parameters per group, this "
                         f"optimizer has {[len(g['params']) for g in ours]}")
    shapes = {index: p.shape for group, mine in zip(theirs, ours) for index, p in zip(group["params"], mine["params"])}
    for index, entry in saved["state"].items():
        if index not in shapes or not isinstance(entry, dict):
            raise CheckpointMismatch(f"{source}: state for unknown parameter {index!r}")
        for key, value in entry.items():
            if torch.is_tensor(value) and value.dim() > 0 and value.shape != shapes[index]:
                raise CheckpointMismatch(f"{source}: {key} of parameter {index} has shape {tuple(value.shape)}, expected "
                                 f"{tuple(shapes[index])}")


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _check_rng(state: Any, source: Path) -> None:
    """The random states have the layout `rng_state` writes (so that setting them cannot fail half-way)."""
    now = rng_state()
    try:
        version, internal, _ = state["python"]
        ok = (version == now["python"][0] and len(internal) == len(now["python"][1])
              and state["numpy"][0] == now["numpy"][0] and np.shape(state["numpy"][1]) == np.shape(now["numpy"][1])
              and torch.is_tensor(state["torch"]) and state["torch"].shape == now["torch"].shape)
    except (KeyError, TypeError, ValueError, IndexError):
        ok = False
    if not ok:
        raise DamagedCheckpoint(f"{source} does not hold the random states of a run (python, numpy, torch)")


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
    return sorted(p for p in directory.iterdir()
                  if p.name.startswith(PREFIX) and p.name[len(PREFIX):].isdigit() and (p / "complete").is_file())


def latest_checkpoint(directory: str | os.PathLike) -> Path | None:
    found = complete_checkpoints(directory)
    return found[-1] if found else None


def clean_staging(directory: str | os.PathLike) -> None:
    """Remove checkpoints that a killed run left half-written."""
    directory = Path(directory)
    if directory.is_dir():
        for stale in directory.glob(f".tmp-{PREFIX}*"):
            shutil.rmtree(stale, ignore_errors=True)


def step_of(checkpoint: Path) -> int:
    return int(checkpoint.name[len(PREFIX):])


def set_aside(out: Path, paths: list[Path]) -> Path | None:
    """Move ``paths`` (inside ``out``) into a new ``out/set-aside-<now>/``, each at its place below ``out``, so
    that the checkpoints left in ``out/checkpoints`` are the current run's alone; None when there is nothing."""
    paths = [p for p in paths if p.exists()]
    if not paths:
        return None
    stamp, number = time.strftime("%Y%m%d-%H%M%S"), 1
    while (target := out / f"{SET_ASIDE}{stamp}{'' if number == 1 else f'-{number}'}").exists():
        number += 1
    for path in paths:
        (target / path.relative_to(out)).parent.mkdir(parents=True, exist_ok=True)
        os.replace(path, target / path.relative_to(out))
    sync_folder(out)
    return target


def set_aside_earlier_run(out: Path) -> str | None:
    """Before a fresh run's first step: the checkpoints an earlier run left in ``out`` (with its ``best/`` and
    ``log.jsonl``) go to ``out/set-aside-<now>/``; otherwise their higher step numbers would outrank this run's
    in the rotation and in ``--resume``. Returns the line that says so (None when there were none)."""
    found = complete_checkpoints(out / "checkpoints")
    if not found:
        return None
    target = set_aside(out, [out / "checkpoints", out / "best", out / "log.jsonl"])
    return (f"note: {out} held the checkpoints of an earlier run (steps {', '.join(str(step_of(p)) for p in found)}); "
            f"moved them to {target} so that this run's checkpoints are its own (delete that folder when not needed)")


def set_aside_after(out: Path, step: int) -> str | None:
    """After resuming from ``step``: the later checkpoints (those that could not be read back) go to
    ``out/set-aside-<now>/``, so that the rotation never keeps them over the ones this run writes next."""
    later = [p for p in complete_checkpoints(out / "checkpoints") if step_of(p) > step]
    target = set_aside(out, later)
    return target and f"note: moved the unreadable checkpoints after step {step} to {target}"
