"""Prefix files on disk: ``prefix_config.json`` + ``prefix.safetensors``, written atomically, never unpickled."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

CONFIG_NAME = "prefix_config.json"
WEIGHTS_NAME = "prefix.safetensors"
PEFT_CONFIG_NAME = "adapter_config.json"
PEFT_WEIGHTS_NAME = "adapter_model.safetensors"
FORMAT = "mmprefix"
FORMAT_VERSION = 1
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _replace_atomically(path: Path, write) -> None:
    """Write through ``write(tmp_path)`` into a temporary file beside ``path``, then rename over it."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_prefix(directory: str | os.PathLike, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> Path:
    """Save tensors and metadata. Each file is replaced atomically; the JSON, written last, carries the
    checksum of the tensors so that a save interrupted between the two files is detected on load."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    weights = directory / WEIGHTS_NAME
    tensors = {name: t.detach().to("cpu", torch.float32).contiguous() for name, t in tensors.items()}
    _replace_atomically(weights, lambda tmp: save_file(tensors, tmp, metadata={"format": FORMAT}))
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, **meta, "weights_sha256": _sha256(weights)}
    text = json.dumps(meta, indent=2, sort_keys=False) + "\n"
    _replace_atomically(directory / CONFIG_NAME, lambda tmp: Path(tmp).write_text(text))
    return directory


def detect_format(directory: str | os.PathLike) -> str:
    """``"mmprefix"`` or ``"peft"``; a clear error for anything else (pickles are refused, never opened)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"no prefix folder at {directory}")
    if (directory / CONFIG_NAME).is_file() and (directory / WEIGHTS_NAME).is_file():
        return "mmprefix"
    if (directory / PEFT_CONFIG_NAME).is_file() and (directory / PEFT_WEIGHTS_NAME).is_file():
        return "peft"
    pickles = sorted(p.name for p in directory.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise ValueError(
            f"{directory} holds only pickle files ({', '.join(pickles)}); mmprefix never unpickles. Save the prefix "
            f"as safetensors ({CONFIG_NAME} + {WEIGHTS_NAME}, or PEFT's {PEFT_CONFIG_NAME} + {PEFT_WEIGHTS_NAME})."
        )
    raise ValueError(
        f"{directory} is not a prefix folder: expected {CONFIG_NAME} + {WEIGHTS_NAME} (mmprefix) or "
        f"{PEFT_CONFIG_NAME} + {PEFT_WEIGHTS_NAME} (PEFT), found {sorted(p.name for p in directory.iterdir())}"
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


def read_peft(directory: str | os.PathLike) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    directory = Path(directory)
    config = json.loads((directory / PEFT_CONFIG_NAME).read_text())
    return config, load_file(directory / PEFT_WEIGHTS_NAME)
