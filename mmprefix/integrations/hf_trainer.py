"""transformers' `Trainer` (and every trainer built on it, TRL's included) with a `PrefixModel`.

* Labels: Trainer finds the label arguments (``labels``) and whether the model can return a loss from the class
  of the model it holds; for a prefix model they are the wrapped model's.
* Saving: a checkpoint and ``save_model`` write the prefix folder `PrefixModel.save_prefix` writes (the active
  prefix, replaced in one atomic rename; any other prefix in a subfolder named after it), not the base weights,
  beside the processor and the training arguments. Reparameterised prefixes keep their MLP, so that training
  resumes exactly.
* Loading: ``resume_from_checkpoint`` and ``load_best_model_at_end`` copy the saved prefixes back into the
  model's own (optimizer, scheduler and random states are Trainer's); a prefix saved with another
  `PrefixConfig` is refused, naming the fields that differ.

FSDP and DeepSpeed shard the parameters this integration saves from one process: they are refused (mmprefix's
own training loop, `mmprefix.training.train`, shards a base with FSDP).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from transformers.utils import can_return_loss, find_labels, is_torch_bf16_available_on_device, logging

from ..core import saving
from ..core.model import PrefixModel
from . import wrap_method

logger = logging.get_logger(__name__)


def patch(name: str, module: ModuleType) -> None:
    """Wrap the `Trainer` methods of ``module`` (``transformers.trainer``) that need to know prefix models."""
    trainer = module.Trainer
    wrap_method(trainer, "__init__", _init)
    wrap_method(trainer, "_save", _save)
    wrap_method(trainer, "_load_from_checkpoint", _load_from_checkpoint)
    wrap_method(trainer, "_load_best_model", _load_best_model)


def prefix_model(trainer: Any) -> PrefixModel | None:
    model = getattr(trainer, "model", None)
    return model if isinstance(model, PrefixModel) else None


def _init(original: Any, self: Any, *args: Any, **kwargs: Any) -> None:
    original(self, *args, **kwargs)
    model = prefix_model(self)
    if model is None:
        return
    if self.is_fsdp_enabled or self.is_deepspeed_enabled:
        raise ValueError("Trainer with FSDP or DeepSpeed shards the prefix that mmprefix saves from one process; "
                         "train a prefix model with plain or DDP data parallelism, or shard the base with "
                         "mmprefix.training.train (TrainConfig(fsdp=True))")
    check_bf16(self.args)
    base = type(model.base_model)
    if self.args.label_names is None:
        self.label_names = find_labels(base)
    self.can_return_loss = can_return_loss(base)


def check_bf16(args: Any) -> None:
    """bf16 asked for on a CPU that cannot compute in bfloat16: one line now, not an error deep in a matmul."""
    if (args.bf16 or args.bf16_full_eval) and args.device.type == "cpu" and not is_torch_bf16_available_on_device("cpu"):
        raise ValueError("bf16=True, but this CPU cannot compute in bfloat16 (torch has no bfloat16 matmul here); "
                         "train in float32 with bf16=False (TRL's configs default to bf16=True: pass bf16=False)")


def _save(original: Any, self: Any, output_dir: str | None = None, state_dict: dict | None = None) -> None:
    model = prefix_model(self)
    if model is None:
        return original(self, output_dir, state_dict)
    if not self.args.should_save:
        return None
    folder = Path(output_dir if output_dir is not None else self.args.output_dir)
    logger.info(f"Saving the prefixes to {folder}")
    save_prefixes(model, folder)
    processor = self.processing_class or getattr(self.data_collator, "tokenizer", None)
    if processor is not None:
        processor.save_pretrained(folder)
    torch.save(self.args, folder / "training_args.bin")  # what Trainer writes beside any model (never read here)
    return None


def prefix_folder(model: PrefixModel, folder: Path, name: str) -> Path:
    """Where ``name`` is saved in a Trainer folder: the active prefix in the folder itself, any other in a
    subfolder of its name (as Trainer saves PEFT's adapters)."""
    return folder if name == model.active_prefix else folder / name


def save_prefixes(model: PrefixModel, folder: Path) -> None:
    for name in model.prefixes:
        model.save_prefix(prefix_folder(model, folder, name), name, keep_reparam=True)


def load_prefixes(model: PrefixModel, folder: Path) -> None:
    """Copy every prefix saved in ``folder`` into the model's prefix of the same name and config."""
    for name, store in model.prefixes.items():
        path = prefix_folder(model, folder, name)
        config, sites, tensors = saving.read_for(model.base_model, path)
        if config != store.config or [s.name for s in sites] != [s.name for s in store.sites]:
            saved, current = dataclasses.asdict(config), dataclasses.asdict(store.config)
            differ = {k: (saved[k], current[k]) for k in saved if saved[k] != current[k]} or "its attention sites"
            raise ValueError(f"the prefix {name!r} in {path} does not fit this model's: {differ} (saved, here); "
                             "resume with the PrefixConfig the run started with, or train into a new output_dir")
        store.load_tensors(tensors)


def _load_from_checkpoint(original: Any, self: Any, resume_from_checkpoint: str, model: Any = None) -> None:
    prefixed = prefix_model(self)
    if prefixed is None:
        return original(self, resume_from_checkpoint, model)
    folder = Path(resume_from_checkpoint)
    if not (folder / "trainer_state.json").is_file():
        raise ValueError(f"{folder} is not a complete checkpoint (no trainer_state.json: the run was probably "
                         "killed while saving it); resume from the checkpoint before it, or delete this one")
    load_prefixes(prefixed, folder)
    return None


def _load_best_model(original: Any, self: Any) -> None:
    model = prefix_model(self)
    if model is None:
        return original(self)
    logger.info(f"Loading the best prefix from {self.state.best_model_checkpoint} (score: {self.state.best_metric})")
    load_prefixes(model, Path(self.state.best_model_checkpoint))
    return None
