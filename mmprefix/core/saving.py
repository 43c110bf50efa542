"""Prefix folders, written so that a kill or a full disk at any moment leaves the old or the new prefix.

A folder holds ``prefix.safetensors``: the tensors and, in the file's header, the metadata (the `PrefixConfig`,
the model it was saved for, every site's geometry, a checksum of the tensors). That one file is the folder's
source of truth and is replaced by one atomic rename, the moment a save takes effect. ``prefix_config.json``
beside it is a readable copy of the metadata, written afterwards (a kill in between leaves the new prefix and
no JSON; loading never reads it). Folders of format 1 (the same JSON, then the only metadata, beside
tensors without it) and PEFT prefix-tuning adapters are read too; pickles never are.

Every loader validates before it allocates: the metadata's fields are checked against their types and against
the tensor shapes in the file's header, then the tensors are read, their checksum compared, and non-finite
values refused, each with a one-line ``ValueError`` that names the file, the field and what was expected.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save as serialize
from torch import nn

from . import peft_compat, typed
from .architectures import Site, find_sites, model_class, prompt_input
from .targets import select_sites
from .conditioning import conditioned
from .config import PrefixConfig
from .files import (FLOATS, atomic_write, load_finite, locked_folder, not_a_file, parse_json_object, read_json,
                    refuse_non_finite, remove_stale_temporaries, safetensors_header, write_text)

CONFIG_NAME = "prefix_config.json"
WEIGHTS_NAME = "prefix.safetensors"
FORMAT = "mmprefix"
FORMAT_VERSION = 2
METADATA_KEY = "mmprefix"  # the metadata's JSON, in the safetensors header
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")


@dataclass
class SavedModel:
    """The model a prefix was saved for."""

    architecture: str | None = None
    model_type: str | None = None
    name_or_path: str | None = None


@dataclass
class SavedSite:
    """One attention site as saved: where it is and the geometry its tensors must have."""

    name: str
    tower: str
    kind: str
    layer: int
    heads: int
    kv_heads: int
    head_dim: int
    route: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in ("self", "cross"):
            raise ValueError(f"kind must be 'self' or 'cross', got {self.kind!r}")
        if self.layer < 0 or min(self.heads, self.kv_heads, self.head_dim) < 1:
            raise ValueError(f"site {self.name!r}: layer must be >= 0 and heads, kv_heads, head_dim >= 1")


@dataclass
class PrefixMeta:
    """The metadata of a saved prefix (``prefix_config.json``, and the header of ``prefix.safetensors``)."""

    format: str
    format_version: int
    prefix_config: PrefixConfig
    sites: list[SavedSite] = field(default_factory=list)
    name: str | None = None
    model: SavedModel = field(default_factory=SavedModel)
    tensors_sha256: str | None = None  # format 2: over the tensors' names, dtypes, shapes and bytes
    weights_sha256: str | None = None  # format 1: of the whole weights file


def tensors_digest(tensors: dict[str, torch.Tensor]) -> str:
    """A checksum of named tensors (names, dtypes, shapes and bytes) that does not depend on the file."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().to("cpu").contiguous()
        digest.update(json.dumps([name, str(tensor.dtype), list(tensor.shape)]).encode())
        digest.update(tensor.view(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_prefix(directory: str | os.PathLike, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> Path:
    """Save tensors and metadata: the weights file (tensors + metadata) replaced in one atomic rename, then
    its readable JSON copy. Temporary files that killed saves left in the folder are removed first. Tensors
    holding NaN or infinity are refused before anything is written (the folder keeps what it held)."""
    directory = Path(directory)
    tensors = {name: t.detach().to("cpu", torch.float32).contiguous() for name, t in tensors.items()}
    refuse_non_finite(tensors, f"the prefix to save in {directory}", "nothing was written")
    directory.mkdir(parents=True, exist_ok=True)
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, **meta, "tensors_sha256": tensors_digest(tensors)}
    text = json.dumps(meta, indent=2) + "\n"
    header = {"format": FORMAT, METADATA_KEY: text}
    with locked_folder(directory):  # two savers into one folder: the JSON always describes the weights
        remove_stale_temporaries(directory, (WEIGHTS_NAME, CONFIG_NAME))
        # serialized here and written by atomic_write: safetensors' save_file would add its own temporary file
        atomic_write(directory / WEIGHTS_NAME, lambda tmp: Path(tmp).write_bytes(serialize(tensors, header)))
        # From here on the folder loads as the new prefix; a JSON left from the old one would misdescribe it.
        (directory / CONFIG_NAME).unlink(missing_ok=True)
        write_text(directory / CONFIG_NAME, text)
    return directory


def detect_format(directory: str | os.PathLike) -> str:
    """``"mmprefix"`` or ``"peft"``; a clear error for anything else (pickles are refused, never opened)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"no prefix folder at {directory}")
    if (directory / WEIGHTS_NAME).is_file():
        return "mmprefix"
    for name in (WEIGHTS_NAME, peft_compat.CONFIG_NAME, peft_compat.WEIGHTS_NAME):
        found = not_a_file(directory / name)
        if found:
            raise ValueError(f"{directory / name} is {found}, not a file: replace it with the saved file")
    if peft_compat.is_peft_folder(directory):
        return "peft"
    pickles = sorted(p.name for p in directory.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise ValueError(
            f"{directory} holds only pickle files ({', '.join(pickles)}); mmprefix never unpickles. Save the prefix "
            f"as safetensors ({WEIGHTS_NAME}, or PEFT's {peft_compat.CONFIG_NAME} + {peft_compat.WEIGHTS_NAME})."
        )
    raise ValueError(
        f"{directory} is not a prefix folder: expected {WEIGHTS_NAME} (mmprefix) or "
        f"{peft_compat.CONFIG_NAME} + {peft_compat.WEIGHTS_NAME} (PEFT), found {sorted(p.name for p in directory.iterdir())}"
    )


def _parse_meta(data: dict[str, Any], source: str) -> PrefixMeta:
    """The metadata, every field checked; a newer format is named as such rather than as bad fields."""
    if data.get("format") != FORMAT:
        raise ValueError(f"{source}: format is {data.get('format')!r}, expected {FORMAT!r} (not an mmprefix prefix)")
    version = data.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise ValueError(f"{source}: format_version must be an integer >= 1, got {version!r}")
    if version > FORMAT_VERSION:
        raise ValueError(f"{source} was written by a newer mmprefix (format_version {version}); upgrade mmprefix")
    meta = typed.build(PrefixMeta, data, source)
    names = [site.name for site in meta.sites]
    if len(set(names)) != len(names):
        raise ValueError(f"{source}: sites names a site twice")
    return meta


def _expected_shapes(meta: PrefixMeta, has_reparam: bool, source: str) -> dict[str, tuple[int | None, ...]]:
    """The tensors the metadata promises and their shapes (None: a size the metadata does not fix)."""
    config, p = meta.prefix_config, meta.prefix_config.num_virtual_tokens
    if config.method == "prompt":
        return {"prompt.embeddings": (p, None)}
    shapes: dict[str, tuple[int | None, ...]] = {}
    for site in meta.sites:
        shapes[f"{site.name}.key"] = shapes[f"{site.name}.value"] = (site.kv_heads, p, site.head_dim)
        if config.gate is not None:
            shapes[f"{site.name}.gate"] = (1,) if config.gate == "scalar" else (site.heads,)
    if config.condition is not None:  # the meta-network; the width of the image features is the model's
        hidden = config.condition_hidden
        width = sum(2 * s.kv_heads * s.head_dim for s in meta.sites if conditioned(s))
        shapes.update({"condition.0.weight": (hidden, None), "condition.0.bias": (hidden,),
                       "condition.2.weight": (width, hidden), "condition.2.bias": (width,)})
    if (config.reparam is not None) != has_reparam:
        raise ValueError(f"{source}: prefix_config.reparam is {config.reparam!r} but the file "
                         f"{'holds' if has_reparam else 'holds no'} reparam.* tensors")
    if has_reparam:
        hidden, width = config.reparam_hidden, sum(2 * s.kv_heads * s.head_dim for s in meta.sites)
        shapes.update({"reparam.embedding": (p, hidden), "reparam.mlp.0.weight": (hidden, hidden),
                       "reparam.mlp.0.bias": (hidden,), "reparam.mlp.2.weight": (width, hidden),
                       "reparam.mlp.2.bias": (width,)})
    return shapes


def _check_header(meta: PrefixMeta, header: dict[str, tuple[str, tuple[int, ...]]], weights: Path, source: str) -> None:
    """The tensors in the file are exactly those the metadata describes, with its shapes: checked on the header,
    before anything is read or allocated."""
    expected = _expected_shapes(meta, any(name.startswith("reparam.") for name in header), source)
    missing, unexpected = sorted(set(expected) - set(header)), sorted(set(header) - set(expected))
    if missing or unexpected:
        parts = [f"missing {missing[:3]}" if missing else "", f"unexpected {unexpected[:3]}" if unexpected else ""]
        raise ValueError(f"{weights} does not hold the tensors {source} describes: " + ", ".join(p for p in parts if p))
    for name, shape in expected.items():
        dtype, actual = header[name]
        if dtype not in FLOATS:
            raise ValueError(f"{weights}: tensor {name!r} is {dtype}, expected floating point ({', '.join(FLOATS)})")
        if len(actual) != len(shape) or any(e is not None and e != a for e, a in zip(shape, actual)):
            wanted = tuple("*" if e is None else e for e in shape)
            raise ValueError(f"{weights}: tensor {name!r} has shape {actual}, expected {wanted} from {source}")


def read_prefix(directory: str | os.PathLike) -> tuple[PrefixMeta, dict[str, torch.Tensor]]:
    """Metadata and tensors of an mmprefix prefix folder, checked against each other before the tensors are
    read; then their checksum and finiteness. The file is opened twice (header, then tensors): when a save
    replaced it in between and the two parts do not match, it is read once more."""
    weights = Path(directory) / WEIGHTS_NAME
    before = _identity(weights)
    try:
        return _read_prefix(directory)
    except ValueError:
        if _identity(weights) == before:
            raise
    return _read_prefix(directory)


def _identity(path: Path) -> tuple[int, ...] | None:
    """Changes when ``path`` is replaced (a rename brings another inode) or rewritten."""
    try:
        found = path.stat()
    except OSError:
        return None
    return found.st_dev, found.st_ino, found.st_mtime_ns, found.st_size


def _read_prefix(directory: str | os.PathLike) -> tuple[PrefixMeta, dict[str, torch.Tensor]]:
    directory = Path(directory)
    weights = directory / WEIGHTS_NAME
    header_meta, header = safetensors_header(weights)
    if METADATA_KEY in header_meta:  # format 2: the metadata travels with the tensors
        source = f"{weights} (metadata)"
        meta = _parse_meta(parse_json_object(header_meta[METADATA_KEY], source, "the prefix metadata"), source)
    else:  # format 1: the JSON file, written after the weights, carries their checksum
        source = str(directory / CONFIG_NAME)
        meta = _parse_meta(read_json(directory / CONFIG_NAME, "the prefix metadata"), source)
    _check_header(meta, header, weights, source)
    if meta.format_version == 1:
        if meta.weights_sha256 is None:
            raise ValueError(f"{source} has no weights_sha256: the tensors cannot be checked; save the prefix again")
        if meta.weights_sha256 != _file_sha256(weights):
            raise ValueError(
                f"{weights} does not match {CONFIG_NAME} (checksum differs): the folder holds parts of two saves, "
                "probably from an interrupted save_prefix of an older mmprefix; save again"
            )
    tensors = load_finite(weights)
    if meta.format_version >= 2:
        if meta.tensors_sha256 is None:
            raise ValueError(f"{source} has no tensors_sha256: the tensors cannot be checked; save the prefix again")
        if meta.tensors_sha256 != tensors_digest(tensors):
            raise ValueError(f"{weights}: the tensors do not match their checksum (tensors_sha256): the file was "
                             "altered after it was saved")
    return meta, tensors


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


def match_sites(saved: list[SavedSite], available: list[Site], expected: list[Site]) -> tuple[list[Site], list[str]]:
    """The model's site for each saved site (same name, else the one with the same tower, kind and layer),
    and, in words, everything that does not fit. ``expected`` are the sites the saved targets select here."""
    by_name = {s.name: s for s in available}
    by_position: dict[tuple, list[Site]] = {}
    for site in available:
        by_position.setdefault((site.tower, site.kind, site.layer), []).append(site)
    matched, missing, problems = [], [], []
    for entry in saved:
        site = by_name.get(entry.name)
        if site is None:
            candidates = by_position.get((entry.tower, entry.kind, entry.layer), [])
            site = candidates[0] if len(candidates) == 1 else None
        if site is None:
            missing.append(entry)
            continue
        for name in ("heads", "kv_heads", "head_dim"):
            if getattr(entry, name) != getattr(site, name):
                problems.append(f"{name} differs at {entry.name}: saved {getattr(entry, name)}, model {getattr(site, name)}")
                break
        matched.append(site)
    towers = sorted({s.tower for s in available})
    for tower in sorted({s.tower for s in saved} | {s.tower for s in expected}):
        saved_layers = {(s.kind, s.layer) for s in saved if s.tower == tower}
        model_layers = {(s.kind, s.layer) for s in expected if s.tower == tower}
        if tower not in towers:
            problems.append(f"this model has no {tower!r} tower (it has {', '.join(towers)})")
        elif saved_layers != model_layers:
            problems.append(f"layers of tower {tower!r}: the prefix has sites at {_layers(saved_layers)}, this model at "
                            f"{_layers(model_layers)} (only in the prefix: {_layers(saved_layers - model_layers)}; "
                            f"only in this model: {_layers(model_layers - saved_layers)})")
    if missing and not problems:
        problems.append(f"{len(missing)} saved attention sites have no counterpart here (e.g. {missing[0].name})")
    return matched, problems


def _layers(sites: set[tuple[str, int]]) -> str:
    """``{("self", 0), ("self", 7)}`` as ``"self 0, self 7"``."""
    return ", ".join(f"{kind} {layer}" for kind, layer in sorted(sites)) or "none"


def read_for(model: nn.Module, directory: str | os.PathLike) -> tuple[PrefixConfig, list[Site], dict[str, torch.Tensor]]:
    """Read a prefix folder and check it fits ``model``: (config, the model's sites, tensors by those sites)."""
    if detect_format(directory) == "peft":
        return peft_compat.read_peft_prefix(model, directory)
    meta, saved_tensors = read_prefix(directory)
    config = meta.prefix_config
    origin = (
        f"the prefix in {directory} was saved for {meta.model.architecture} "
        f"(model_type={meta.model.model_type!r})"
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
    sites, problems = match_sites(meta.sites, available, expected)
    if problems:
        raise ValueError(f"{origin} and does not fit this {_describe(model)}: " + "; ".join(problems))
    # names and shapes were checked against the metadata; the metadata's geometry against the model's sites
    tensors = {k: v for k, v in saved_tensors.items() if k.startswith(("reparam.", "condition."))}
    for entry, site in zip(meta.sites, sites):
        for part in ("key", "value", "gate"):
            if f"{entry.name}.{part}" in saved_tensors:
                tensors[f"{site.name}.{part}"] = saved_tensors[f"{entry.name}.{part}"]
    return config, sites, tensors


def _describe(model: nn.Module) -> str:
    config = getattr(model, "config", None)
    return f"{type(model).__name__} (model_type={getattr(config, 'model_type', None)!r})"
