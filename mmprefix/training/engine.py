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
import time
from collections.abc import Callable
from dataclasses import dataclass, field
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
from ..model import PrefixModel
from . import checkpoints, distributed


class TrainingError(RuntimeError):
    """Training cannot go on (a non-finite loss); the message says where and what is kept."""


@dataclass
class TrainConfig:
    """Settings of one training run (recipes fill it from their YAML configs)."""

    output_dir: str
    max_steps: int = 500
    batch_size: int = 16  # rows per optimizer step and micro-step, split across processes
    gradient_accumulation_steps: int = 1
    learning_rate: float = 5e-3
    weight_decay: float = 0.0
    warmup_steps: int = 0
    max_grad_norm: float | None = 1.0
    mixed_precision: str = "no"  # "no", "fp16" or "bf16"
    gradient_checkpointing: bool = False
    fsdp: bool = False  # shard the frozen base across processes (FSDP2); the prefix stays whole on each
    seed: int = 0
    log_every: int = 10
    eval_every: int = 0  # 0: evaluate once, at the end
    save_every: int = 0  # 0: no resumable checkpoints
    keep_checkpoints: int = 2
    resume: bool = False
    metric: str | None = None  # the evaluation metric that picks the best model
    greater_is_better: bool = True
    trackers: list[str] = field(default_factory=list)  # accelerate trackers, e.g. ["tensorboard"]
    num_workers: int = 0
    plot: bool = True

    def __post_init__(self) -> None:
        if self.mixed_precision is False:  # YAML reads an unquoted `no` as false
            self.mixed_precision = "no"
        if self.mixed_precision not in ("no", "fp16", "bf16"):
            raise ValueError(f"mixed_precision must be 'no', 'fp16' or 'bf16', got {self.mixed_precision!r}")
        if self.max_steps < 1 or self.batch_size < 1 or self.gradient_accumulation_steps < 1:
            raise ValueError("max_steps, batch_size and gradient_accumulation_steps must be >= 1")


def default_loss(model: nn.Module, batch: dict[str, Any]) -> torch.Tensor:
    return model(**batch).loss


def save_trained(model: nn.Module, directory: str | os.PathLike) -> None:
    """A PrefixModel saves its prefix; a PEFT or transformers model uses save_pretrained; anything else gets
    its trainable weights as safetensors."""
    if isinstance(model, PrefixModel):
        model.save_prefix(directory)
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
) -> dict[str, Any]:
    """Train ``model`` on ``dataset``; returns the final state (steps, last loss, metrics, paths)."""
    out = Path(config.output_dir)
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
    distributed.refuse_deepspeed(accelerator)
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
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        checkpoints.clean_staging(checkpoint_dir)
        if not config.resume:
            (out / "log.jsonl").unlink(missing_ok=True)
    accelerator.wait_for_everyone()
    if config.resume:
        latest = checkpoints.latest_checkpoint(checkpoint_dir)
        if latest is not None:
            state = _load(latest, unwrapped, optimizer, scheduler, accelerator)
            accelerator.print(f"resuming from {latest} (step {state['step']})")
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
                _check_finite(loss, state["step"] + 1, accelerator, checkpoint_dir)
                accelerator.backward(loss)
                if sharded and accelerator.sync_gradients:
                    distributed.average_gradients(parameters)
                if accelerator.sync_gradients and config.max_grad_norm:
                    accelerator.clip_grad_norm_(parameters, config.max_grad_norm)
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
            if config.save_every and (step % config.save_every == 0 or final):
                _save(checkpoint_dir, state, unwrapped, optimizer, scheduler, accelerator, config)
            if final:
                break
        else:
            state["epoch"] += 1
            state["batch_in_epoch"] = 0
    progress.close()
    if accelerator.is_main_process:
        save(unwrapped, out / "prefix")
        if config.plot:
            plot_curves(out / "log.jsonl", out / "curves.png")
    accelerator.wait_for_everyone()
    if config.trackers:
        accelerator.end_training()
    unwrapped.eval()
    return {"step": state["step"], "metrics": metrics, "best": state["best"], "output_dir": str(out)}


def _check_finite(loss: torch.Tensor, step: int, accelerator: Accelerator, checkpoint_dir: Path) -> None:
    values = accelerator.gather(loss.detach().float()[None])
    if torch.isfinite(values).all():
        return
    latest = checkpoints.latest_checkpoint(checkpoint_dir)
    kept = f"the last good checkpoint is {latest}" if latest else "no checkpoint was written (save_every=0)"
    raise TrainingError(
        f"the loss became {values.tolist()} at step {step}; training stopped and {kept}. Lower the learning rate, "
        "check the data of this step, or train in float32"
    )


def _evaluate(evaluate, model, step, state, config, accelerator, save, out: Path, sharded: bool) -> dict[str, float]:
    metrics: dict[str, float] = {}
    model.eval()
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
    accelerator.wait_for_everyone()
    best = [state["best"]]
    if accelerator.num_processes > 1:
        torch.distributed.broadcast_object_list(best, src=0)
    state["best"] = best[0]
    return metrics


def _save(directory: Path, state, model, optimizer, scheduler, accelerator, config: TrainConfig) -> None:
    rank = accelerator.process_index
    parts: dict[str, Any] = {f"rng-rank{rank}": checkpoints.rng_state()}
    if accelerator.is_main_process:
        parts["trainable"] = {n: p for n, p in model.named_parameters() if p.requires_grad}
        parts["optimizer"] = optimizer.state_dict()
        parts["scheduler"] = scheduler.state_dict()
        parts["state"] = {**state, "processes": accelerator.num_processes, "config": dataclasses.asdict(config)}
        if accelerator.scaler is not None:
            parts["scaler"] = accelerator.scaler.state_dict()
    checkpoints.stage_checkpoint(directory, state["step"], parts)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        checkpoints.publish_checkpoint(directory, state["step"], config.keep_checkpoints)
    accelerator.wait_for_everyone()


def _load(path: Path, model, optimizer, scheduler, accelerator) -> dict[str, Any]:
    state = checkpoints.read_part(path, "state")
    if state["processes"] != accelerator.num_processes:
        raise ValueError(
            f"{path} was written by {state['processes']} processes; resume with the same number "
            f"(now {accelerator.num_processes}) so that every process gets its random state back"
        )
    trainable = checkpoints.read_part(path, "trainable")
    named = dict(model.named_parameters())
    with torch.no_grad():
        for name, tensor in trainable.items():
            if name not in named:
                raise ValueError(f"{path} holds weights for {name!r}, which this model does not have")
            named[name].copy_(tensor)
    optimizer.load_state_dict(checkpoints.read_part(path, "optimizer"))
    scheduler.load_state_dict(checkpoints.read_part(path, "scheduler"))
    if accelerator.scaler is not None and (path / "scaler.json").is_file():
        accelerator.scaler.load_state_dict(checkpoints.read_part(path, "scaler"))
    checkpoints.set_rng_state(checkpoints.read_part(path, f"rng-rank{accelerator.process_index}"))
    return {k: state[k] for k in ("step", "epoch", "batch_in_epoch", "best", "samples")}


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
