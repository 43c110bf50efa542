"""Loading a model for a task from a short spec, and data paths: shared by the evaluation harness and the
recipes. A spec is ``embedded:NAME[:HEAD]`` (the tiny backbones shipped with mmprefix), a local folder or a
Hugging Face id, or ``open_clip:MODEL[:PRETRAINED]``. A checkpoint that is not there (offline, a typo) is a
``LoadError`` with one readable line, never a long traceback."""

from __future__ import annotations

from collections import Counter

import os
from typing import Any


class LoadError(ValueError):
    """A model or data path that cannot be loaded; the message says what to fix."""




def load_model(spec: str, task: str, quantize: str | None = None) -> tuple[Any, Any]:
    """``(model, processor)`` in eval mode from a model spec, its linear weights quantized if asked (see
    `quantize_weights`); a missing checkpoint is a LoadError."""
    if spec.startswith("embedded:"):
        model, processor = load_embedded(spec, task)
    elif spec.startswith("open_clip:"):
        model, processor = load_open_clip(spec)
    else:
        model, processor = load_transformers(spec, task)
    return quantize_weights(model, quantize), processor


def quantize_weights(model: Any, scheme: str | None) -> Any:
    """``model`` with the weights of its linear layers quantized in place by torchao (a frozen base for prefix
    tuning: activations and the prefix stay in floating point). ``"int8"``: Int8WeightOnlyConfig, one scale
    per output channel. ``"int4"``: IntxWeightOnlyConfig, int4 values with one scale per 32 weights, stored one
    per byte (torchao's packed Int4WeightOnlyConfig needs a GPU). None: unchanged. A linear layer whose weight
    is tied to another module (an LM head tied to the input embedding) stays as it is: quantizing it would untie
    the two and store the matrix twice; so does the output projection of ``nn.MultiheadAttention``."""
    if scheme is None:
        return model
    if scheme not in QUANTIZATIONS:
        raise LoadError(f"quantize must be one of {sorted(QUANTIZATIONS)} or unset, got {scheme!r}")
    try:
        from torchao.quantization import quantize_
    except ImportError:
        raise LoadError(f"quantize={scheme!r} needs torchao: pip install torchao") from None
    import torch

    uses = Counter(id(p) for _, p in model.named_parameters(remove_duplicate=False))
    # nn.MultiheadAttention (open_clip's blocks) reads its out_proj weight inside F.multi_head_attention_forward,
    # which torchao's tensors do not support; its in_proj is no nn.Linear anyway
    skipped = {ident for ident, count in uses.items() if count > 1} | {
        id(m.out_proj.weight) for m in model.modules() if isinstance(m, torch.nn.MultiheadAttention)}
    quantize_(model, QUANTIZATIONS[scheme](),
              filter_fn=lambda module, _: isinstance(module, torch.nn.Linear) and id(module.weight) not in skipped)
    return model


def _int8() -> Any:
    from torchao.quantization import Int8WeightOnlyConfig

    return Int8WeightOnlyConfig()


def _int4() -> Any:
    import torch
    from torchao.quantization import IntxWeightOnlyConfig
    from torchao.quantization.granularity import PerGroup

    return IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(32))


QUANTIZATIONS = {"int8": _int8, "int4": _int4}  # scheme -> torchao config


def load_embedded(spec: str, task: str) -> tuple[Any, Any]:
    from mmprefix.embedded import head_for, load_backbone

    _, name, *head = spec.split(":")
    try:
        return load_backbone(name, head[0] if head else head_for(name, task))
    except (FileNotFoundError, ValueError) as err:
        raise LoadError(str(err)) from None


def load_open_clip(spec: str) -> tuple[Any, Any]:
    import open_clip

    _, name, *pretrained = spec.split(":", 2)
    if pretrained and offline() and not os.path.isfile(pretrained[0]) and not open_clip_weights_cached(name, pretrained[0]):
        raise LoadError(f"cannot load open_clip model {spec!r}: its weights are not in the local cache and the hub is "
                        "offline (HF_HUB_OFFLINE); download them once online, or give a weights file as PRETRAINED")
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=pretrained[0] if pretrained else None)
        tokenizer = open_clip.get_tokenizer(name)
    except Exception as err:  # unknown name, weights not downloadable offline, ...
        raise LoadError(f"cannot load open_clip model {spec!r}: {type(err).__name__}: {err}") from None
    return model.eval(), (tokenizer, preprocess)


def open_clip_weights_cached(name: str, tag: str) -> bool:
    """Whether open_clip finds the weights of ``name:tag`` on disk (its Hugging Face cache entry or its download
    folder), so that loading them offline does not wait on network retries. Unknown tags count as cached: open_clip
    names them itself, at once."""
    from huggingface_hub import try_to_load_from_cache
    from open_clip.pretrained import get_pretrained_cfg

    config = get_pretrained_cfg(name, tag)
    if not config:
        return True
    if config.get("hf_hub"):
        repo, filename = os.path.split(config["hf_hub"])
        names = [filename or "open_clip_pytorch_model.bin"]
        names.append(os.path.splitext(names[0])[0] + ".safetensors")
        if any(isinstance(try_to_load_from_cache(repo, n), str) for n in names):
            return True
    url = config.get("url", "")
    return bool(url) and os.path.isfile(os.path.join(os.path.expanduser("~/.cache/clip"), os.path.basename(url)))


def offline() -> bool:
    import huggingface_hub.constants

    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes") or huggingface_hub.constants.HF_HUB_OFFLINE


def load_transformers(spec: str, task: str) -> tuple[Any, Any]:
    import transformers

    if not os.path.isdir(spec) and (spec.startswith((".", "/", "~")) or spec.count("/") > 1):
        raise LoadError(f"cannot load model {spec!r}: no such folder")
    local_only = os.path.isdir(spec) or offline()
    model_class = pick_class(task, transformers_config(spec, local_only))
    try:
        model = model_class.from_pretrained(spec, local_files_only=local_only)
        processor_class = transformers.AutoTokenizer if task == "text" else transformers.AutoProcessor
        processor = processor_class.from_pretrained(spec, local_files_only=local_only)
    except (OSError, ValueError) as err:
        raise LoadError(f"cannot load model {spec!r}: {first_line(err)}") from None
    return model.eval(), processor


def transformers_config(spec: str, local_only: bool) -> Any:
    """The model's config: from the folder or the local cache first (no network round trip for what is there)."""
    import transformers

    try:
        return transformers.AutoConfig.from_pretrained(spec, local_files_only=True)
    except (OSError, ValueError) as err:
        if local_only:
            where = ("the folder has no usable config.json" if os.path.isdir(spec)
                     else "it is not in the local Hugging Face cache and the hub is offline (HF_HUB_OFFLINE)")
            raise LoadError(f"cannot load model {spec!r}: {where} ({first_line(err)})") from None
    try:
        return transformers.AutoConfig.from_pretrained(spec)
    except (OSError, ValueError) as err:
        raise LoadError(f"cannot load model {spec!r}: not a local folder, not cached, and not downloadable "
                         f"({first_line(err)})") from None


def first_line(err: BaseException) -> str:
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__


def task_classes(task: str) -> dict[str, list[str]]:
    """``{model_type: [transformers class names]}`` that evaluate ``task``, from the family records."""
    from mmprefix.core.families import FAMILIES

    return {key: f.tasks[task] for f in FAMILIES if task in f.tasks for key in f.keys}


def pick_class(task: str, config: Any) -> type:
    """The transformers class that evaluates ``task`` for this config: its own architecture when that fits."""
    import transformers

    if task == "text":
        return transformers.AutoModelForCausalLM
    supported = task_classes(task)
    choices = supported.get(config.model_type)
    if not choices:
        raise LoadError(f"no {task} evaluation for model_type {config.model_type!r}; supported: {sorted(supported)}")
    architecture = next((a for a in (config.architectures or []) if a in choices), choices[0])
    return getattr(transformers, architecture)


def data_path(spec: str) -> str:
    """``world:NAME`` is a file of the synthetic world (built on first use, in seconds); paths may hold ``~`` and
    ``$VARIABLES``."""
    if spec.startswith("world:"):
        from mmprefix.data import synthetic

        return str(synthetic.build_world() / f"{spec.split(':', 1)[1]}.jsonl")
    return os.path.expandvars(os.path.expanduser(spec))


