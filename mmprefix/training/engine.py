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
import time
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

from ..models.adapters import adapters_of, save_adapters
from ..core.devices import placed_by_hooks
from ..core.model import PrefixModel
from . import checkpoints, distributed, lock
from .checkpoints import Position
from .config import TrainConfig, TrainingError, TrainingInterrupted
from .resume import keep_log_until, resume
from .signals import StopSignals


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
        run = Run(model, dataset, collate, config, evaluate=evaluate, loss_fn=loss_fn, save=save, settings=settings)
        run.setup()
        return run.train(stop)


class Run:
    """One training run: ``setup`` (accelerate, optimizer, scheduler, the folder, resuming), then ``train``, which
    takes a ``step`` per batch and, on their schedules, logs, ``evaluate``s and writes a ``checkpoint``; ``finish``
    saves what was trained."""

    def __init__(self, model: nn.Module, dataset: Dataset, collate: Callable[[list], dict[str, Any]],
                 config: TrainConfig, *, evaluate: Callable[[nn.Module], dict[str, float]] | None,
                 loss_fn: Callable[[nn.Module, dict[str, Any]], torch.Tensor],
                 save: Callable[[nn.Module, str | os.PathLike], None], settings: dict[str, Any] | None) -> None:
        self.model, self.dataset, self.collate, self.config = model, dataset, collate, config
        self.evaluate_fn, self.loss_fn, self.save_fn, self.settings = evaluate, loss_fn, save, settings
        self.out = Path(config.output_dir)
        self.checkpoint_dir = self.out / "checkpoints"
        self.position = Position()
        self.metrics: dict[str, float] = {}

    # -- setup ------------------------------------------------------------------------------------------------
    def setup(self) -> None:
        config = self.config
        distributed.refuse_deepspeed()
        # One process may train several times (comparisons, tests): each run sets its own mixed precision.
        AcceleratorState._reset_state()
        self.accelerator = accelerator = Accelerator(
            mixed_precision=config.mixed_precision,
            gradient_accumulation_steps=config.gradient_accumulation_steps,
            cpu=not torch.cuda.is_available(),  # without it, processes on a GPU-less machine never synchronise
            dataloader_config=DataLoaderConfiguration(split_batches=True),
            log_with=config.trackers or None,
            project_dir=str(self.out),
            kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
        )
        if config.batch_size % accelerator.num_processes:
            raise ValueError(f"batch_size {config.batch_size} must divide among {accelerator.num_processes} processes")
        set_seed(config.seed)
        if config.gradient_checkpointing:
            self.model.gradient_checkpointing_enable()
        self.parameters = [p for p in self.model.parameters() if p.requires_grad]
        if not sum(p.numel() for p in self.parameters):  # none, or only empty ones (a prefix of 0 virtual tokens)
            raise ValueError("the model has no trainable parameters")
        if len(self.dataset) < config.batch_size:  # before the sampler, which fails on an empty dataset in its words
            raise ValueError(f"the dataset has {len(self.dataset)} rows, fewer than one batch of {config.batch_size}")
        self._prepare()
        self._claim_folder()
        if config.trackers:
            accelerator.init_trackers("mmprefix", config=_flat(dataclasses.asdict(config)))

    def _prepare(self) -> None:
        """The optimizer and scheduler, and the model sharded or placed by accelerate."""
        config, accelerator = self.config, self.accelerator
        optimizer = torch.optim.AdamW(self.parameters, lr=config.learning_rate, weight_decay=config.weight_decay)
        scheduler = get_cosine_schedule_with_warmup(optimizer, config.warmup_steps, config.max_steps)
        self.model.train()
        self.sharded = distributed.wanted(config.fsdp, accelerator)
        if self.sharded:  # sharded by torch's fully_shard, not wrapped by accelerate (see distributed.py)
            distributed.shard(self.model, accelerator.device)
            if accelerator.is_main_process:
                print(f"FSDP: the frozen base is sharded across {accelerator.num_processes} processes, the prefix "
                      "whole on each")
            self.optimizer, self.scheduler = accelerator.prepare(optimizer, scheduler)
        else:  # a dispatched or offloaded model stays where accelerate's hooks put it
            placement = [not placed_by_hooks(self.model), True, True]
            self.model, self.optimizer, self.scheduler = accelerator.prepare(
                self.model, optimizer, scheduler, device_placement=placement)
        self.unwrapped = accelerator.unwrap_model(self.model)

    def _claim_folder(self) -> None:
        """The output folder made this run's: an earlier run's checkpoints set aside, or resumed from."""
        accelerator, out = self.accelerator, self.out
        with distributed.together(accelerator, f"preparing {out}"):
            if accelerator.is_main_process:
                out.mkdir(parents=True, exist_ok=True)
                checkpoints.clean_staging(self.checkpoint_dir)
                if not self.config.resume:  # this run's checkpoints must be its own: an earlier run's are set aside
                    _note(checkpoints.set_aside_earlier_run(out))
                    (out / "log.jsonl").unlink(missing_ok=True)
        if self.config.resume:
            resumed = resume(self.checkpoint_dir, self.unwrapped, self.optimizer, self.scheduler, accelerator,
                             self.config, self.settings)
            self.position = resumed or self.position
            if accelerator.is_main_process:
                keep_log_until(out / "log.jsonl", self.position.step)  # a resumed step is logged again: once
                _note(checkpoints.set_aside_after(out, self.position.step))

    # -- the loop ---------------------------------------------------------------------------------------------
    def train(self, stop: StopSignals) -> dict[str, Any]:
        config, position = self.config, self.position
        self.progress = tqdm(total=config.max_steps, initial=position.step, desc="training", unit="step",
                             disable=not self.accelerator.is_local_main_process)
        self.window, self.window_start = [], time.perf_counter()
        while position.step < config.max_steps:
            for batch in self._batches():
                loss = self.step(batch)
                position.batch_in_epoch += 1
                position.samples += config.batch_size
                self.window.append(loss)
                if not self.accelerator.sync_gradients:
                    continue
                position.step += 1
                self.progress.update(1)
                if self._after_step(stop):
                    break
            else:
                position.epoch += 1
                position.batch_in_epoch = 0
        self.progress.close()
        return self.finish()

    def _batches(self) -> Any:
        """This epoch's batches (epoch ``e`` shuffles with seed ``seed + e``), from the run's place in it."""
        config, position = self.config, self.position
        loader = DataLoader(self.dataset, batch_size=config.batch_size, shuffle=True, collate_fn=self.collate,
                            generator=torch.Generator().manual_seed(config.seed + position.epoch), drop_last=True,
                            num_workers=config.num_workers)
        loader = self.accelerator.prepare_data_loader(loader, device_placement=True)
        if position.batch_in_epoch:
            loader = self.accelerator.skip_first_batches(loader, position.batch_in_epoch)
        return loader

    def step(self, batch: dict[str, Any]) -> torch.Tensor:
        """Forward, backward and (at the end of an accumulation) the update; refused before the update when the
        loss or the gradient is not finite. Returns the detached loss."""
        accelerator, step = self.accelerator, self.position.step + 1
        with accelerator.accumulate(self.model):
            with accelerator.autocast() if self.sharded else contextlib.nullcontext():
                loss = self.loss_fn(self.model, batch)
            _refuse_non_finite("loss", loss.detach().float()[None], step, accelerator, self.config)
            accelerator.backward(loss)
            if self.sharded and accelerator.sync_gradients:
                distributed.average_gradients(self.parameters)
            if accelerator.sync_gradients:
                _check_gradients(self.parameters, step, accelerator, self.config)
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad()
        return loss.detach().float()

    def _after_step(self, stop: StopSignals) -> bool:
        """Log, evaluate and checkpoint on their schedules; stop on a signal. True after the last step."""
        config, step = self.config, self.position.step
        final = step == config.max_steps
        if step % config.log_every == 0 or final:
            self._log_window()
        if self.evaluate_fn is not None and (final or (config.eval_every and step % config.eval_every == 0)):
            self.metrics = self.evaluate(step)
        saved_now = bool(config.save_every) and (step % config.save_every == 0 or final)
        if saved_now:
            self.checkpoint()
        signal_number = stop.agreed(self.accelerator)
        if signal_number and not final:
            if not saved_now:
                self.checkpoint()
            self.progress.close()
            latest = checkpoints.latest_checkpoint(self.checkpoint_dir)
            raise TrainingInterrupted(f"{signal.Signals(signal_number).name} stopped training after step {step}; "
                                      f"checkpoint {latest} holds it: run the same command with --resume to "
                                      "continue", signal_number, str(latest))
        return final

    def _log_window(self) -> None:
        """The mean loss and the throughput since the last log line."""
        accelerator = self.accelerator
        mean = accelerator.gather(torch.stack(self.window).mean()[None]).mean().item()
        rate = len(self.window) * self.config.batch_size / (time.perf_counter() - self.window_start)
        record = {"step": self.position.step, "loss": mean, "lr": self.scheduler.get_last_lr()[0],
                  "samples_per_second": rate}
        _log(self.out, record, accelerator)
        self.progress.set_postfix(loss=f"{mean:.4f}", samples_s=f"{rate:.1f}")
        self.window, self.window_start = [], time.perf_counter()

    # -- evaluation, checkpoints, the end ------------------------------------------------------------------
    def evaluate(self, step: int) -> dict[str, float]:
        """The evaluation hook's metrics (on the main process, or every process of a sharded model); the best
        model so far saved into ``best/`` by the chosen metric."""
        accelerator, model = self.accelerator, self.unwrapped
        metrics: dict[str, float] = {}
        model.eval()
        with distributed.together(accelerator, f"evaluating at step {step}"):
            if self.sharded or accelerator.is_main_process:  # a sharded model needs every process in each forward
                with torch.no_grad():
                    metrics = {k: float(v) for k, v in self.evaluate_fn(model).items()}
            if accelerator.is_main_process:
                _log(self.out, {"step": step, **{f"eval/{k}": v for k, v in metrics.items()}}, accelerator)
                self._keep_best(step, metrics)
        model.train()
        best = [self.position.best]
        if accelerator.num_processes > 1:
            torch.distributed.broadcast_object_list(best, src=0)
        self.position.best = best[0]
        return metrics

    def _keep_best(self, step: int, metrics: dict[str, float]) -> None:
        config = self.config
        name = config.metric or next(iter(metrics), None)
        if name is None:
            return
        if name not in metrics:
            raise ValueError(f"metric {name!r} is not among the evaluation results {sorted(metrics)}")
        value, best = metrics[name], self.position.best
        if best is None or (value > best["value"] if config.greater_is_better else value < best["value"]):
            self.position.best = {"step": step, "metric": name, "value": value}
            self.save_fn(self.unwrapped, self.out / "best")

    def checkpoint(self) -> None:
        """Write and publish the checkpoint of this step: every process its random state, the main process the
        trainable weights, the optimizer, the scheduler and the run's position and settings."""
        accelerator, step = self.accelerator, self.position.step
        with distributed.together(accelerator, f"writing the checkpoint of step {step}"):
            parts: dict[str, Any] = {f"rng-rank{accelerator.process_index}": checkpoints.rng_state()}
            if accelerator.is_main_process:
                parts["trainable"] = {n: p for n, p in self.unwrapped.named_parameters() if p.requires_grad}
                broken = [n for n, p in parts["trainable"].items() if not torch.isfinite(p).all()]
                if broken:  # the guards of the loop make this unreachable; a checkpoint must never hold it
                    raise TrainingError(f"weights {broken[:3]} are not finite at step {step}; no checkpoint written")
                parts["optimizer"] = self.optimizer.state_dict()
                parts["scheduler"] = self.scheduler.state_dict()
                parts["state"] = {**dataclasses.asdict(self.position), "processes": accelerator.num_processes,
                                  "config": dataclasses.asdict(self.config), "settings": self.settings}
                if accelerator.scaler is not None:
                    parts["scaler"] = accelerator.scaler.state_dict()
            checkpoints.stage_checkpoint(self.checkpoint_dir, step, parts)
        with distributed.together(accelerator, f"publishing the checkpoint of step {step}"):
            if accelerator.is_main_process:
                checkpoints.publish_checkpoint(self.checkpoint_dir, step, self.config.keep_checkpoints)

    def finish(self) -> dict[str, Any]:
        """Save what was trained (and the curves); the run's result."""
        accelerator, out = self.accelerator, self.out
        saved = out / saved_name(self.unwrapped)
        with distributed.together(accelerator, f"saving {saved}"):
            if accelerator.is_main_process:
                self.save_fn(self.unwrapped, saved)
                if self.config.plot:
                    plot_curves(out / "log.jsonl", out / "curves.png")
        if self.config.trackers:
            accelerator.end_training()
        self.unwrapped.eval()
        return {"step": self.position.step, "metrics": self.metrics, "best": self.position.best,
                "output_dir": str(out), "saved": str(saved)}


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


def _note(line: str | None) -> None:
    if line:
        print(line, file=sys.stderr)


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
