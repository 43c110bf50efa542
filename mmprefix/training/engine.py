"""The training engine every recipe uses: one plain loop on accelerate, no trainer framework.

``train(model, dataset, collate, config)`` runs AdamW over whatever the model trains (a prefix, or LoRA or all
weights for comparison) with warmup + cosine decay, mixed precision, gradient accumulation and clipping, on
one or many processes (``accelerate launch``). It evaluates every N steps through a hook, keeps the best and
the last model, writes checkpoints that resume to the same result after a kill, stops on a non-finite loss
naming the step, and logs to ``log.jsonl`` (plus accelerate trackers and a PNG of the curves).

Batches are global: ``batch_size`` rows per optimizer step before accumulation, split across processes, so a
run gives the same steps on any number of processes. Epoch ``e`` shuffles with seed ``seed + e``, which is
what makes the data position resumable.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import signal
import sys
import threading
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator, DataLoaderConfiguration, DistributedDataParallelKwargs
from accelerate.state import AcceleratorState
from accelerate.utils import set_seed
from safetensors.torch import save_file
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm
from transformers import get_cosine_schedule_with_warmup

from ..devices import placed_by_hooks
from ..files import write_text
from ..adapters import adapters_of, save_adapters
from ..model import PrefixModel
from . import checkpoints, distributed, lock
from .config import TrainConfig, TrainingError, TrainingInterrupted


def default_loss(model: nn.Module, batch: dict[str, Any]) -> torch.Tensor:
    return model(**batch).loss


def saved_name(model: nn.Module) -> str:
    """The folder a trained model is saved in, named for what was trained: ``prefix``, ``prompt`` (a soft
    prompt), ``memory``, a PEFT adapter's type (``lora``), ``adapter`` (bottleneck adapters), or ``model``
    (every weight)."""
    if isinstance(model, PrefixModel):
        return model.prefixes[model.active_prefix].config.method
    if adapters_of(model):
        return "adapter"
    peft_config = getattr(model, "peft_config", None)
    if isinstance(peft_config, dict) and peft_config:
        kind = next(iter(peft_config.values())).peft_type
        return str(getattr(kind, "value", kind)).lower()
    return "model"


def save_trained(model: nn.Module, directory: str | os.PathLike) -> None:
    """A PrefixModel saves its prefix; a PEFT or transformers model uses save_pretrained; anything else gets
    its trainable weights as safetensors."""
    if isinstance(model, PrefixModel):
        model.save_prefix(directory)
    elif adapters_of(model):
        save_adapters(model, directory)
    elif hasattr(model, "save_pretrained"):
        model.save_pretrained(directory)
    else:
        Path(directory).mkdir(parents=True, exist_ok=True)
        weights = {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}
        save_file(weights, Path(directory) / "model.safetensors")


def train(
    model: nn.Module,
    dataset: Dataset,
    collate: Callable[[list], dict[str, Any]],
    config: TrainConfig,
    evaluate: Callable[[nn.Module], dict[str, float]] | None = None,
    loss_fn: Callable[[nn.Module, dict[str, Any]], torch.Tensor] = default_loss,
    save: Callable[[nn.Module, str | os.PathLike], None] = save_trained,
    settings: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Train ``model`` on ``dataset``; returns the final state (steps, metrics, best step, paths).

    The run owns ``config.output_dir`` (a second run on it is refused, see `mmprefix.training.lock`). With
    ``config.resume`` it continues from the latest checkpoint that reads back whole (a damaged one is skipped with a
    warning) after comparing the checkpoint's settings with these (``settings``: what else defines the run, e.g. a
    recipe's model, method and data); a difference is refused unless ``config.resume_with_changes``. SIGTERM and
    SIGINT end the run after the current step with a checkpoint (`TrainingInterrupted`). A non-finite loss or
    gradient stops it before the step's update (`TrainingError`), so the weights and every checkpoint stay finite.
    """
    out = Path(config.output_dir)
    # The folder is claimed first, before accelerate's process-wide state is touched; by global rank 0 only.
    with lock.holding(out) if int(os.environ.get("RANK", "0")) == 0 else contextlib.nullcontext(), \
            StopSignals() as stop:
        return _train(model, dataset, collate, config, evaluate, loss_fn, save, settings, stop)


def _train(model, dataset, collate, config: TrainConfig, evaluate, loss_fn, save, settings,
           stop: StopSignals) -> dict[str, Any]:
    out = Path(config.output_dir)
    distributed.refuse_deepspeed()
    # One process may train several times (comparisons, tests): each run sets its own mixed precision.
    AcceleratorState._reset_state()
    accelerator = Accelerator(
        mixed_precision=config.mixed_precision,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        cpu=not torch.cuda.is_available(),  # without it, processes on a GPU-less machine never synchronise
        dataloader_config=DataLoaderConfiguration(split_batches=True),
        log_with=config.trackers or None,
        project_dir=str(out),
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
    )
    if config.batch_size % accelerator.num_processes:
        raise ValueError(f"batch_size {config.batch_size} must divide among {accelerator.num_processes} processes")
    set_seed(config.seed)
    if config.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    parameters = [p for p in model.parameters() if p.requires_grad]
    if not parameters:
        raise ValueError("the model has no trainable parameters")
    optimizer = torch.optim.AdamW(parameters, lr=config.learning_rate, weight_decay=config.weight_decay)
    scheduler = get_cosine_schedule_with_warmup(optimizer, config.warmup_steps, config.max_steps)
    model.train()
    sharded = distributed.wanted(config.fsdp, accelerator)
    if sharded:  # sharded by torch's fully_shard, not wrapped by accelerate (see distributed.py)
        distributed.shard(model, accelerator.device)
        if accelerator.is_main_process:
            print(f"FSDP: the frozen base is sharded across {accelerator.num_processes} processes, the prefix whole on each")
        optimizer, scheduler = accelerator.prepare(optimizer, scheduler)
    else:  # a dispatched or offloaded model stays where accelerate's hooks put it
        placement = [not placed_by_hooks(model), True, True]
        model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler, device_placement=placement)
    unwrapped = accelerator.unwrap_model(model)
    checkpoint_dir = out / "checkpoints"
    state = {"step": 0, "epoch": 0, "batch_in_epoch": 0, "best": None, "samples": 0}
    with distributed.together(accelerator, f"preparing {out}"):
        if accelerator.is_main_process:
            out.mkdir(parents=True, exist_ok=True)
            checkpoints.clean_staging(checkpoint_dir)
            if not config.resume:
                (out / "log.jsonl").unlink(missing_ok=True)
    if config.resume:
        state = _resume(checkpoint_dir, unwrapped, optimizer, scheduler, accelerator, config, settings) or state
        if accelerator.is_main_process:
            _keep_log_until(out / "log.jsonl", state["step"])  # a resumed step is logged again: once
    if config.trackers:
        accelerator.init_trackers("mmprefix", config=_flat(dataclasses.asdict(config)))

    metrics: dict[str, float] = {}
    progress = tqdm(total=config.max_steps, initial=state["step"], disable=not accelerator.is_local_main_process,
                    desc="training", unit="step")
    window, window_start = [], time.perf_counter()
    while state["step"] < config.max_steps:
        loader = DataLoader(
            dataset,
            batch_size=config.batch_size,
            shuffle=True,
            generator=torch.Generator().manual_seed(config.seed + state["epoch"]),
            collate_fn=collate,
            drop_last=True,
            num_workers=config.num_workers,
        )
        if len(loader) == 0:
            raise ValueError(f"the dataset has {len(dataset)} rows, fewer than one batch of {config.batch_size}")
        loader = accelerator.prepare_data_loader(loader, device_placement=True)
        if state["batch_in_epoch"]:
            loader = accelerator.skip_first_batches(loader, state["batch_in_epoch"])
        for batch in loader:
            with accelerator.accumulate(model):
                with accelerator.autocast() if sharded else contextlib.nullcontext():
                    loss = loss_fn(model, batch)
                _refuse_non_finite("loss", loss.detach().float()[None], state["step"] + 1, accelerator, config)
                accelerator.backward(loss)
                if sharded and accelerator.sync_gradients:
                    distributed.average_gradients(parameters)
                if accelerator.sync_gradients:
                    _check_gradients(parameters, state["step"] + 1, accelerator, config)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
            state["batch_in_epoch"] += 1
            state["samples"] += config.batch_size
            window.append(loss.detach().float())
            if not accelerator.sync_gradients:
                continue
            state["step"] += 1
            progress.update(1)
            step = state["step"]
            if step % config.log_every == 0 or step == config.max_steps:
                mean = accelerator.gather(torch.stack(window).mean()[None]).mean().item()
                rate = len(window) * config.batch_size / (time.perf_counter() - window_start)
                record = {"step": step, "loss": mean, "lr": scheduler.get_last_lr()[0], "samples_per_second": rate}
                _log(out, record, accelerator)
                progress.set_postfix(loss=f"{mean:.4f}", samples_s=f"{rate:.1f}")
                window, window_start = [], time.perf_counter()
            final = step == config.max_steps
            if evaluate is not None and (final or (config.eval_every and step % config.eval_every == 0)):
                metrics = _evaluate(evaluate, unwrapped, step, state, config, accelerator, save, out, sharded)
            saved_now = bool(config.save_every) and (step % config.save_every == 0 or final)
            if saved_now:
                _save(checkpoint_dir, state, unwrapped, optimizer, scheduler, accelerator, config, settings)
            signal_number = stop.agreed(accelerator)
            if signal_number and not final:
                if not saved_now:
                    _save(checkpoint_dir, state, unwrapped, optimizer, scheduler, accelerator, config, settings)
                progress.close()
                latest = checkpoints.latest_checkpoint(checkpoint_dir)
                raise TrainingInterrupted(f"{signal.Signals(signal_number).name} stopped training after step {step}; "
                                          f"checkpoint {latest} holds it: run the same command with --resume to "
                                          "continue", signal_number, str(latest))
            if final:
                break
        else:
            state["epoch"] += 1
            state["batch_in_epoch"] = 0
    progress.close()
    saved = out / saved_name(unwrapped)
    with distributed.together(accelerator, f"saving {saved}"):
        if accelerator.is_main_process:
            save(unwrapped, saved)
            if config.plot:
                plot_curves(out / "log.jsonl", out / "curves.png")
    if config.trackers:
        accelerator.end_training()
    unwrapped.eval()
    return {"step": state["step"], "metrics": metrics, "best": state["best"], "output_dir": str(out),
            "saved": str(saved)}


class StopSignals:
    """While training, SIGTERM (a scheduler's preemption) and SIGINT (Ctrl-C) ask the loop to stop after the
    current step, with a checkpoint; a second one of either stops at once. Installed only in the main thread."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.received = 0
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for number in self.SIGNALS:
                self._previous[number] = signal.signal(number, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous = {}

    def _handle(self, number: int, frame: Any) -> None:
        if self.received:  # asked twice: no more waiting for the step to end
            self.__exit__()
            signal.raise_signal(number)
            return
        self.received = number
        print(f"\n{signal.Signals(number).name}: stopping after this step, with a checkpoint (again to stop now)",
              file=sys.stderr)

    def agreed(self, accelerator: Accelerator) -> int:
        """The signal any process received (every process must stop at the same step)."""
        if accelerator.num_processes == 1:
            return self.received
        flag = torch.tensor([self.received], device=accelerator.device)
        return int(accelerator.reduce(flag, reduction="max").item())


def _resume(directory: Path, model, optimizer, scheduler, accelerator, config: TrainConfig,
            settings: dict[str, Any] | None) -> dict[str, Any] | None:
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
        state = _apply(path, parts, parameters, optimizer, scheduler, accelerator)
        accelerator.print(f"resuming from {path} (step {state['step']})")
        return state
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


def _keep_log_until(log: Path, step: int) -> None:
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


def _refuse_non_finite(what: str, values: torch.Tensor, step: int, accelerator: Accelerator,
                       config: TrainConfig) -> None:
    """Stop before a non-finite loss or gradient can reach the weights; name the last good checkpoint."""
    values = accelerator.gather(values)
    if torch.isfinite(values).all():
        return
    latest = checkpoints.latest_checkpoint(Path(config.output_dir) / "checkpoints")
    kept = (f"the last good checkpoint is {latest}" if latest else
            f"no checkpoint was written yet (save_every={config.save_every})")
    raise TrainingError(
        f"the {what} became {values.tolist()} at step {step}; training stopped before the step's update, the "
        f"weights are those of step {step - 1} and {kept}. Lower the learning rate, check the data of this step, "
        "or train in float32"
    )


def _check_gradients(parameters: list[nn.Parameter], step: int, accelerator: Accelerator, config: TrainConfig) -> None:
    """Clip the step's gradients (when asked) and refuse non-finite ones. With fp16 the gradient scaler owns
    overflows: it skips such a step itself and lowers its scale."""
    if config.max_grad_norm:
        norm = accelerator.clip_grad_norm_(parameters, config.max_grad_norm)
    else:
        norm = torch.nn.utils.get_total_norm([p.grad for p in parameters if p.grad is not None])
    if accelerator.scaler is None:
        _refuse_non_finite("gradient norm", torch.as_tensor(norm, dtype=torch.float32).reshape(1), step, accelerator,
                           config)


def _evaluate(evaluate, model, step, state, config, accelerator, save, out: Path, sharded: bool) -> dict[str, float]:
    metrics: dict[str, float] = {}
    model.eval()
    with distributed.together(accelerator, f"evaluating at step {step}"):
        if sharded or accelerator.is_main_process:  # a sharded model needs every process in each forward
            with torch.no_grad():
                metrics = {k: float(v) for k, v in evaluate(model).items()}
        if accelerator.is_main_process:
            _log(out, {"step": step, **{f"eval/{k}": v for k, v in metrics.items()}}, accelerator)
            name = config.metric or next(iter(metrics), None)
            if name is not None:
                if name not in metrics:
                    raise ValueError(f"metric {name!r} is not among the evaluation results {sorted(metrics)}")
                value, best = metrics[name], state["best"]
                better = best is None or (value > best["value"] if config.greater_is_better else value < best["value"])
                if better:
                    state["best"] = {"step": step, "metric": name, "value": value}
                    save(model, out / "best")
    model.train()
    best = [state["best"]]
    if accelerator.num_processes > 1:
        torch.distributed.broadcast_object_list(best, src=0)
    state["best"] = best[0]
    return metrics


def _save(directory: Path, state, model, optimizer, scheduler, accelerator, config: TrainConfig,
          settings: dict[str, Any] | None) -> None:
    rank = accelerator.process_index
    with distributed.together(accelerator, f"writing the checkpoint of step {state['step']}"):
        parts: dict[str, Any] = {f"rng-rank{rank}": checkpoints.rng_state()}
        if accelerator.is_main_process:
            parts["trainable"] = {n: p for n, p in model.named_parameters() if p.requires_grad}
            broken = [n for n, p in parts["trainable"].items() if not torch.isfinite(p).all()]
            if broken:  # the guards of the loop make this unreachable; a checkpoint must never hold it
                raise TrainingError(f"weights {broken[:3]} are not finite at step {state['step']}; no checkpoint written")
            parts["optimizer"] = optimizer.state_dict()
            parts["scheduler"] = scheduler.state_dict()
            parts["state"] = {**state, "processes": accelerator.num_processes, "config": dataclasses.asdict(config),
                              "settings": settings}
            if accelerator.scaler is not None:
                parts["scaler"] = accelerator.scaler.state_dict()
        checkpoints.stage_checkpoint(directory, state["step"], parts)
    with distributed.together(accelerator, f"publishing the checkpoint of step {state['step']}"):
        if accelerator.is_main_process:
            checkpoints.publish_checkpoint(directory, state["step"], config.keep_checkpoints)


def _apply(path: Path, parts: dict[str, Any], parameters: dict[str, nn.Parameter], optimizer, scheduler,
           accelerator) -> dict[str, Any]:
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
    return {"step": state.step, "epoch": state.epoch, "batch_in_epoch": state.batch_in_epoch, "best": state.best,
            "samples": state.samples}


def _log(out: Path, record: dict[str, Any], accelerator: Accelerator) -> None:
    if accelerator.is_main_process:
        with open(out / "log.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
    if accelerator.trackers:
        accelerator.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])


def _flat(config: dict[str, Any]) -> dict[str, Any]:
    return {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in config.items()}


def plot_curves(log: str | os.PathLike, png: str | os.PathLike) -> None:
    """Loss and evaluation metrics against steps, from ``log.jsonl``."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    records = [json.loads(line) for line in Path(log).read_text().splitlines() if line.strip()]
    losses = [(r["step"], r["loss"]) for r in records if "loss" in r]
    evals = [r for r in records if any(k.startswith("eval/") for k in r)]
    names = sorted({k for r in evals for k in r if k.startswith("eval/")})
    figure, axes = plt.subplots(1, 1 + bool(names), figsize=(6 + 6 * bool(names), 4), squeeze=False)
    if losses:
        axes[0][0].plot(*zip(*losses))
    axes[0][0].set(xlabel="step", ylabel="training loss", title="loss")
    for name in names:
        points = [(r["step"], r[name]) for r in evals if name in r and not math.isnan(r[name])]
        axes[0][1].plot(*zip(*points), marker="o", label=name[5:])
    if names:
        axes[0][1].set(xlabel="step", title="evaluation")
        axes[0][1].legend()
    figure.tight_layout()
    figure.savefig(png, dpi=100)
    plt.close(figure)
