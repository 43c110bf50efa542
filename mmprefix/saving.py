"""Prefix folders: ``prefix_config.json`` + ``prefix.safetensors`` (or a PEFT prefix-tuning adapter), written
atomically, never unpickled, and matched against the model they are loaded onto."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from . import peft_compat
from .architectures import Site, find_sites, model_class, prompt_input, select_sites
from .config import PrefixConfig
from .files import atomic_write, write_text

CONFIG_NAME = "prefix_config.json"
WEIGHTS_NAME = "prefix.safetensors"
FORMAT = "mmprefix"
FORMAT_VERSION = 1
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_prefix(directory: str | os.PathLike, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> Path:
    """Save tensors and metadata. Each file is replaced atomically; the JSON, written last, carries the
    checksum of the tensors so that a save interrupted between the two files is detected on load."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    weights = directory / WEIGHTS_NAME
    tensors = {name: t.detach().to("cpu", torch.float32).contiguous() for name, t in tensors.items()}
    atomic_write(weights, lambda tmp: save_file(tensors, tmp, metadata={"format": FORMAT}))
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, **meta, "weights_sha256": _sha256(weights)}
    text = json.dumps(meta, indent=2, sort_keys=False) + "\n"
    write_text(directory / CONFIG_NAME, text)
    return directory


def detect_format(directory: str | os.PathLike) -> str:
    """``"mmprefix"`` or ``"peft"``; a clear error for anything else (pickles are refused, never opened)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"no prefix folder at {directory}")
    if (directory / CONFIG_NAME).is_file() and (directory / WEIGHTS_NAME).is_file():
        return "mmprefix"
    if peft_compat.is_peft_folder(directory):
        return "peft"
    pickles = sorted(p.name for p in directory.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise ValueError(
            f"{directory} holds only pickle files ({', '.join(pickles)}); mmprefix never unpickles. Save the prefix "
            f"as safetensors ({CONFIG_NAME} + {WEIGHTS_NAME}, or PEFT's {peft_compat.CONFIG_NAME} + {peft_compat.WEIGHTS_NAME})."
        )
    raise ValueError(
        f"{directory} is not a prefix folder: expected {CONFIG_NAME} + {WEIGHTS_NAME} (mmprefix) or "
        f"{peft_compat.CONFIG_NAME} + {peft_compat.WEIGHTS_NAME} (PEFT), found {sorted(p.name for p in directory.iterdir())}"
    )


def read_prefix(directory: str | os.PathLike) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Metadata and tensors of an mmprefix prefix folder, checked against each other."""
    directory = Path(directory)
    try:
        meta = json.loads((directory / CONFIG_NAME).read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{directory / CONFIG_NAME} is not valid JSON: {err}") from None
    if meta.get("format") != FORMAT:
        raise ValueError(f"{directory / CONFIG_NAME} is not an mmprefix prefix config (format={meta.get('format')!r})")
    if meta.get("format_version", 0) > FORMAT_VERSION:
        raise ValueError(
            f"{directory} was written by a newer mmprefix (format_version {meta['format_version']}); upgrade mmprefix"
        )
    weights = directory / WEIGHTS_NAME
    if meta.get("weights_sha256") not in (None, _sha256(weights)):
        raise ValueError(
            f"{weights} does not match {CONFIG_NAME} (checksum differs): the folder holds parts of two saves, "
            "probably from an interrupted save_prefix; save again"
        )
    return meta, load_file(weights)


def save(directory: str | os.PathLike, model: nn.Module, name: str, store: nn.Module, keep_reparam: bool) -> Path:
    """Write prefix ``name`` (a store of ``model``, the wrapped base model) into ``directory``."""
    saved_config, tensors = store.config, store.tensors()
    if store.config.reparam is not None:
        if keep_reparam:
            tensors.update({f"reparam.{k}": v for k, v in store.reparam_tensors().items()})
        else:
            saved_config = dataclasses.replace(saved_config, reparam=None)
    config = getattr(model, "config", None)
    meta = {
        "name": name,
        "prefix_config": saved_config.to_dict(),
        "model": {
            "architecture": model_class(model).__name__,
            "model_type": getattr(config, "model_type", None),
            "name_or_path": getattr(config, "_name_or_path", None) or None,
        },
        "sites": [site.to_dict() for site in store.sites],
    }
    return write_prefix(directory, tensors, meta)


def match_sites(saved: list[dict], available: list[Site], expected: list[Site]) -> tuple[list[Site], list[str]]:
    """The model's site for each saved site (same name, else the one with the same tower, kind and layer),
    and, in words, everything that does not fit. ``expected`` are the sites the saved targets select here."""
    by_name = {s.name: s for s in available}
    by_position: dict[tuple, list[Site]] = {}
    for site in available:
        by_position.setdefault((site.tower, site.kind, site.layer), []).append(site)
    matched, missing, problems = [], [], []
    for entry in saved:
        site = by_name.get(entry["name"])
        if site is None:
            candidates = by_position.get((entry["tower"], entry["kind"], entry["layer"]), [])
            site = candidates[0] if len(candidates) == 1 else None
        if site is None:
            missing.append(entry)
            continue
        for field in ("heads", "kv_heads", "head_dim"):
            if entry[field] != getattr(site, field):
                problems.append(f"{field} differs at {entry['name']}: saved {entry[field]}, model {getattr(site, field)}")
                break
        matched.append(site)
    towers = sorted({s.tower for s in available})
    for tower in sorted({s["tower"] for s in saved} | {s.tower for s in expected}):
        saved_layers = {(s["kind"], s["layer"]) for s in saved if s["tower"] == tower}
        model_layers = {(s.kind, s.layer) for s in expected if s.tower == tower}
        if tower not in towers:
            problems.append(f"this model has no {tower!r} tower (it has {', '.join(towers)})")
        elif saved_layers != model_layers:
            problems.append(
                f"layers: the prefix has {len(saved_layers)} sites in tower {tower!r}, this model {len(model_layers)}"
            )
    if missing and not problems:
        problems.append(f"{len(missing)} saved attention sites have no counterpart here (e.g. {missing[0]['name']})")
    return matched, problems


def read_for(model: nn.Module, directory: str | os.PathLike) -> tuple[PrefixConfig, list[Site], dict[str, torch.Tensor]]:
    """Read a prefix folder and check it fits ``model``: (config, the model's sites, tensors by those sites)."""
    if detect_format(directory) == "peft":
        return peft_compat.read_peft_prefix(model, directory)
    meta, saved_tensors = read_prefix(directory)
    config = PrefixConfig.from_dict(meta["prefix_config"])
    saved_model = meta.get("model", {})
    origin = (
        f"the prefix in {directory} was saved for {saved_model.get('architecture')} "
        f"(model_type={saved_model.get('model_type')!r})"
    )
    if config.method == "prompt":
        try:
            dim = prompt_input(model).embedding.embedding_dim
        except ValueError as err:
            raise ValueError(f"{origin} and cannot go on {_describe(model)}: {err}") from None
        shape = tuple(saved_tensors["prompt.embeddings"].shape)
        if shape != (config.num_virtual_tokens, dim):
            raise ValueError(f"{origin}: its soft prompt is {shape}, this {_describe(model)} embeds text in {dim} dimensions")
        return config, [], saved_tensors
    try:
        available = find_sites(model, config.target_modules)
    except ValueError as err:
        raise ValueError(f"{origin} and cannot go on {_describe(model)}: {err}") from None
    try:
        expected = select_sites(available, config.targets)
    except ValueError:
        expected = []
    sites, problems = match_sites(meta["sites"], available, expected)
    if problems:
        raise ValueError(f"{origin} and does not fit this {_describe(model)}: " + "; ".join(problems))
    tensors = {k: v for k, v in saved_tensors.items() if k.startswith("reparam.")}
    for entry, site in zip(meta["sites"], sites):
        shapes = {"key": (site.kv_heads, config.num_virtual_tokens, site.head_dim)}
        shapes["value"] = shapes["key"]
        if config.gate is not None:
            shapes["gate"] = (1,) if config.gate == "scalar" else (site.heads,)
        for part, shape in shapes.items():
            tensor = saved_tensors.get(f"{entry['name']}.{part}")
            if tensor is None or tuple(tensor.shape) != shape:
                got = None if tensor is None else tuple(tensor.shape)
                raise ValueError(f"{directory}: tensor {entry['name']}.{part} has shape {got}, expected {shape}")
            tensors[f"{site.name}.{part}"] = tensor
    return config, sites, tensors


def _describe(model: nn.Module) -> str:
    config = getattr(model, "config", None)
    return f"{type(model).__name__} (model_type={getattr(config, 'model_type', None)!r})"
