"""Prefix tuning with the frozen base sharded across processes: FSDP2 (torch's ``fully_shard``).

Each layer of the base model becomes one FSDP group and the rest of the base one root group: every process
keeps ``1/N`` of each base weight and all-gathers a layer's weights just before the layer runs (forward, and
again in backward). The prefixes are not sharded: they are small, every process keeps all of them as plain
tensors, and `average_gradients` averages their gradients over the processes before each optimizer step
(what DDP does for replicated weights). So ``save_prefix``, training checkpoints and resuming work from rank 0
as without sharding: there is nothing to gather.

Why not accelerate's FSDP plugin: with ``cpu=True`` (the only way launched CPU processes synchronise)
accelerate 1.15 ignores it and wraps the model in DDP, and on GPUs it would shard the prefixes into the root
group, where ``save_prefix`` on rank 0 alone would see only its shard. ``fully_shard`` itself runs on CPU with
gloo (torch 2.14.1) and on GPUs with NCCL.

A sharded model needs every process in each forward: evaluation during training runs on all processes (the
main one reports); after training, evaluate the saved prefix on the base loaded whole (or dispatched with
``device_map``).
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from accelerate import Accelerator, DistributedType
from accelerate.utils import gather_object, parse_flag_from_env
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, fully_shard, register_fsdp_forward_method

from ..core.architectures import family_of
from ..core.model import PrefixModel
from .config import TrainingError

# Methods that run sub-modules without the root's forward (generation, feature extraction): FSDP must gather the
# root group's weights around them too.
ENTRY_METHODS = ("generate", "get_image_features", "get_text_features", "get_qformer_features", "encode_image",
                 "encode_text")


def wanted(fsdp: bool, accelerator: Accelerator) -> bool:
    """Whether to shard: asked for (``TrainConfig.fsdp``, or ``accelerate launch --use_fsdp``) with several
    processes (on one, there is nothing to shard across)."""
    plugin = accelerator.distributed_type == DistributedType.FSDP or parse_flag_from_env("ACCELERATE_USE_FSDP")
    return accelerator.num_processes > 1 and (fsdp or plugin)


def refuse_deepspeed() -> None:
    """DeepSpeed is refused. ZeRO-3 partitions every parameter, the prefix too, and gathers a partition only
    around its own module's forward, while attention modules read the prefix (tried with deepspeed 0.19.8 on
    CPU: the prefix arrives empty); ZeRO-1 and -2 shard optimizer state and gradients, which a frozen base has
    none of. (With ``cpu=True`` accelerate would ignore DeepSpeed and run plain data parallelism.) Checked before
    the `Accelerator` is built: ``accelerate launch`` asks for DeepSpeed through the environment, and building one
    without deepspeed installed would fail first, with an error that does not say what to do instead."""
    if parse_flag_from_env("ACCELERATE_USE_DEEPSPEED"):
        raise ValueError(
            "mmprefix does not train under DeepSpeed: ZeRO-3 would partition the prefix too, and ZeRO-1/2 save "
            "nothing on a frozen base. Shard the base with FSDP instead: accelerate launch --config_file "
            "examples/fsdp.yaml ..., or train.fsdp=true"
        )


def shard(model: PrefixModel, device: torch.device) -> None:
    """Shard ``model``'s frozen base in place across the default process group (every process calls this) and
    put the prefixes on ``device``, this process's device.

    A layer whose weights are tied to a module outside it (BLIP's text embeddings and its decoder head) stays
    in the root group; scalar weights (CLIP's ``logit_scale``), which ``fully_shard`` refuses, stay whole."""
    if not isinstance(model, PrefixModel):
        raise ValueError(f"sharding (fsdp=True) is for prefix tuning: it needs a PrefixModel, not {type(model).__name__}")
    base = model.base_model
    if is_sharded(model):
        return
    trainable = [n for n, p in base.named_parameters() if p.requires_grad]
    if trainable:
        raise ValueError(f"sharding (fsdp=True) keeps the base frozen, but {trainable[0]} requires grad")
    quantized = [(n, p) for n, p in base.named_parameters() if _quantized(p)]
    if quantized:
        name, parameter = quantized[0]
        raise ValueError(
            f"sharding (fsdp=True) cannot split quantized weights ({name} is a {type(parameter.data).__name__}; "
            "FSDP2 cuts every weight into per-process pieces, which torchao's and bitsandbytes' weights do not "
            "survive whole): shard the base unquantized, or train the quantized base without fsdp"
        )
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    family = family_of(base)  # layer classes that transformers' _no_split_modules leaves out (open_clip has none)
    layers = set(getattr(base, "_no_split_modules", None) or ()) | set(family.shard_layers if family else ())
    names = Counter(id(p) for _, p in base.named_parameters(remove_duplicate=False))
    tied = {i for i, count in names.items() if count > 1}
    scalars = {p for p in base.parameters() if p.dim() == 0}
    for module in _outermost(base, layers):
        if not any(id(p) in tied for p in module.parameters()):
            fully_shard(module, mesh=mesh, ignored_params={p for p in module.parameters() if p in scalars} or None)
    fully_shard(base, mesh=mesh, ignored_params=scalars or None)
    for parameter in [*scalars, *model.prefixes.parameters()]:  # fully_shard moved only what it shards
        parameter.data = parameter.data.to(device)
    for method in ENTRY_METHODS:
        if callable(getattr(base, method, None)):
            register_fsdp_forward_method(base, method)


def _quantized(parameter: nn.Parameter) -> bool:
    """torchao keeps a quantized weight as a tensor subclass, bitsandbytes as a Parameter subclass. Tried sharded on
    two gloo processes: torchao's fail ("aten.split" is not implemented for them), bitsandbytes' 8-bit ones too
    (the gathered weight lacks its int8 state), and its 4-bit ones give the unsharded loss and gradients but
    generate other tokens after the first (so evaluation during training would be wrong)."""
    return type(parameter.data) is not torch.Tensor or type(parameter) not in (nn.Parameter, torch.Tensor)


def _outermost(module: nn.Module, classes: set[str]) -> list[nn.Module]:
    """Sub-modules whose class is in ``classes`` and that lie inside no other such module."""
    found = []
    for child in module.children():
        if type(child).__name__ in classes:
            found.append(child)
        else:
            found.extend(_outermost(child, classes))
    return found


def is_sharded(model: nn.Module) -> bool:
    """Whether ``model`` (a PrefixModel) has a base sharded by `shard`."""
    return isinstance(getattr(model, "base_model", None), FSDPModule)


def average_gradients(parameters: list[nn.Parameter]) -> None:
    """Average the replicated prefix's gradients over the processes, in one collective; every process calls
    this. A parameter without a gradient here counts as zero; one without a gradient anywhere keeps none (the
    optimizer skips it, as in one process)."""
    device = parameters[0].device  # NCCL reduces GPU tensors, gloo CPU ones
    grads = [p.grad.float() if p.grad is not None else torch.zeros(p.shape, device=device) for p in parameters]
    present = torch.tensor([float(p.grad is not None) for p in parameters], device=device)
    flat = torch.cat([g.reshape(-1) for g in grads] + [present])
    dist.all_reduce(flat)  # gloo has no AVG: sum, then divide
    chunks = flat[: -len(parameters)].div_(dist.get_world_size()).split([p.numel() for p in parameters])
    for parameter, chunk, anywhere in zip(parameters, chunks, flat[-len(parameters):]):
        parameter.grad = chunk.view_as(parameter).to(parameter.dtype) if anywhere else None


def local_parameter_bytes(module: nn.Module) -> int:
    """Bytes of parameters this process holds for ``module``: its shards of sharded weights, whole others."""
    total = 0
    for parameter in module.parameters():
        local = parameter.to_local() if hasattr(parameter, "to_local") else parameter
        total += local.numel() * local.element_size()
    return total


def gathered(accelerator: Accelerator, value: Any) -> list[Any]:
    """``value`` from every process, in rank order (every process calls this)."""
    return gather_object([value]) if accelerator.num_processes > 1 else [value]


@contextlib.contextmanager
def together(accelerator: Accelerator, what: str) -> Iterator[None]:
    """A block that some processes run (the main one alone, or each its own part), ending with every process
    knowing whether it failed anywhere: the process that failed raises its own error, the others a
    `TrainingError` naming it. Without this, an error on one process leaves the others waiting at the next
    barrier until it times out (30 minutes by default) or the launcher kills them without saying why. The end
    of the block is a barrier."""
    error: Exception | None = None
    try:
        yield
    except Exception as err:
        error = err
    failures = gathered(accelerator, None if error is None else f"{type(error).__name__}: {error}")
    if error is not None:
        raise error
    failed = [(rank, message) for rank, message in enumerate(failures) if message is not None]
    if failed:
        rank, message = failed[0]
        raise TrainingError(f"process {rank} failed while {what} ({message}); process "
                            f"{accelerator.process_index} stops with it")
