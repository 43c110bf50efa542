"""Resuming a run: the latest checkpoint every process reads back whole, checked against the run's settings, put
back into the model, optimizer, scheduler and random generators; the log cut back to it."""

from __future__ import annotations

import dataclasses
import json
import math
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..core.files import write_text
from . import checkpoints, distributed
from .checkpoints import Position
from .config import TrainConfig, TrainingError


def resume(directory: Path, model, optimizer, scheduler, accelerator, config: TrainConfig,
           settings: dict[str, Any] | None) -> Position | None:
    """Load the latest checkpoint that reads back whole (damaged ones are skipped with a warning), after checking
    that it was written with this run's settings; None when there is none (the run starts fresh, and says so).
    Every process resumes from the same one: a checkpoint any process cannot read (each reads its own random
    state) is skipped by all."""
    found = checkpoints.complete_checkpoints(directory)
    if not found:
        accelerator.print(f"--resume: no checkpoint in {directory}; starting fresh from step 0")
        return None
    parameters = {n: p for n, p in model.named_parameters() if p.requires_grad}
    damaged = []
    for path in reversed(found):
        unreadable = None
        with distributed.together(accelerator, f"reading {path}"):
            try:
                parts = checkpoints.read_checkpoint(path, parameters, optimizer, accelerator.process_index)
            except checkpoints.DamagedCheckpoint as err:
                unreadable = str(err)
        reasons = distributed.gathered(accelerator, unreadable)
        if any(reasons):
            why = "; ".join(reason if len(reasons) == 1 else f"process {rank}: {reason}"
                            for rank, reason in enumerate(reasons) if reason)
            damaged.append(why)
            warnings.warn(f"checkpoint {path.name} cannot be read back ({why}); trying the one before", stacklevel=2)
            continue
        _compare(path, parts["state"], config, settings)
        position = _apply(path, parts, parameters, optimizer, scheduler, accelerator)
        accelerator.print(f"resuming from {path} (step {position.step})")
        return position
    raise checkpoints.DamagedCheckpoint(f"no checkpoint in {directory} reads back whole: {'; '.join(damaged)}")


# Settings that may change when a run is resumed: how long it goes on, how often it logs, evaluates and saves.
RESUMABLE_CHANGES = ("output_dir", "max_steps", "log_every", "eval_every", "save_every", "keep_checkpoints",
                     "resume", "resume_with_changes", "trackers", "num_workers", "plot")


def _compare(path: Path, saved: checkpoints.RunState, config: TrainConfig, settings: dict[str, Any] | None) -> None:
    """Refuse to resume a checkpoint written with other settings (unless told to), naming every difference."""
    now = dataclasses.asdict(config)
    differences = [f"train.{key}: checkpoint {saved.config.get(key)!r}, now {value!r}" for key, value in now.items()
                   if key not in RESUMABLE_CHANGES and saved.config.get(key) != value]
    if saved.settings is not None:  # checkpoints of versions that did not record them are compared on train only
        before, after = _dotted(saved.settings), _dotted(settings or {})
        differences += [f"{key}: checkpoint {before.get(key)!r}, now {after.get(key)!r}"
                        for key in sorted(set(before) | set(after)) if before.get(key) != after.get(key)]
    if not differences:
        return
    listed = "; ".join(differences)
    if not config.resume_with_changes:
        raise TrainingError(f"{path} was written with other settings ({listed}): resume with the same settings, or "
                            "pass --resume-with-changes (train.resume_with_changes=true) to continue anyway")
    warnings.warn(f"resuming {path} with changed settings: {listed}", stacklevel=3)


def _dotted(tree: Any, prefix: str = "") -> dict[str, Any]:
    """A nested mapping as ``{"a.b": value}``, values as JSON gives them back (tuples become lists)."""
    if isinstance(tree, dict) and tree:
        return {k: v for key, value in tree.items() for k, v in _dotted(value, f"{prefix}{key}.").items()}
    return {prefix.rstrip("."): json.loads(json.dumps(tree))} if prefix else {}


def keep_log_until(log: Path, step: int) -> None:
    """Drop what a killed run logged after the checkpoint it is resumed from: each step is logged once."""
    if log.is_file():
        lines = [line for line in log.read_text().splitlines() if line.strip()]
        kept = [line for line in lines if _logged_step(line) <= step]
        if len(kept) != len(lines):
            write_text(log, "".join(line + "\n" for line in kept))


def _logged_step(line: str) -> float:
    """The step a log line records; a line cut short by a kill counts as after every checkpoint (dropped)."""
    try:
        return json.loads(line).get("step", 0)
    except json.JSONDecodeError:
        return math.inf


def _apply(path: Path, parts: dict[str, Any], parameters: dict[str, nn.Parameter], optimizer, scheduler,
           accelerator) -> Position:
    """Put a read and checked checkpoint into the model, optimizer, scheduler and random generators."""
    state = parts["state"]
    if state.processes != accelerator.num_processes:
        raise checkpoints.CheckpointMismatch(
            f"{path} was written by {state.processes} processes; resume with the same number "
            f"(now {accelerator.num_processes}) so that every process gets its random state back"
        )
    with torch.no_grad():
        for name, tensor in parts["trainable"].items():
            parameters[name].copy_(tensor)
    optimizer.load_state_dict(parts["optimizer"])
    scheduler.load_state_dict(parts["scheduler"])
    if accelerator.scaler is not None and "scaler" in parts:
        accelerator.scaler.load_state_dict(parts["scaler"])
    checkpoints.set_rng_state(parts["rng"])
    return Position(state.step, state.epoch, state.batch_in_epoch, state.samples, state.best)
