"""`PrefixModel`: a frozen model with named prefixes in its attention sites; `add_prefix`, `load_prefix`."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from . import checkpoint
from .architectures import Site, find_sites, select_sites
from .config import PrefixConfig
from .layer import Prefix, install, uninstall
from .peft_compat import read_peft_prefix, shifted_positions
from .prefix import PrefixStore


class PrefixModel(nn.Module):
    """Wraps a model, freezes every base parameter and routes prefixes into its attention sites.

    The wrapped model is modified in place (its targeted attention modules look up the active prefix), so
    calling it directly also uses the prefix. ``forward``, ``generate`` and every other attribute are
    delegated to it. Use `add_prefix` to build one.
    """

    def __init__(self, model: nn.Module, config: PrefixConfig | None = None, name: str = "default") -> None:
        super().__init__()
        if isinstance(model, PrefixModel):
            raise ValueError("model is already a PrefixModel; use its add_prefix() method to add another prefix")
        self.base_model = model
        self.prefixes = nn.ModuleDict()
        self.active_prefix: str | None = None
        self._disabled = False
        self._installed: dict[str, Site] = {}
        self._position_hook = None
        self._base_requires_grad = {n: p.requires_grad for n, p in model.named_parameters()}
        for parameter in model.parameters():
            parameter.requires_grad_(False)
        if config is not None:
            self.add_prefix(name, config)

    # -- delegation -------------------------------------------------------------------------------------
    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model":
                raise
            return getattr(self.base_model, name)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.base_model(*args, **kwargs)

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        return self.base_model.generate(*args, **kwargs)

    # -- prefixes ---------------------------------------------------------------------------------------
    @property
    def sites(self) -> list[Site]:
        """Attention sites that carry a prefix: name, tower, kind, layer, heads, kv_heads, head_dim."""
        return list(self._installed.values())

    def add_prefix(self, name: str, config: PrefixConfig) -> PrefixStore:
        """Add a new named prefix with fresh parameters; the first one added becomes active."""
        sites = select_sites(find_sites(self.base_model, config.target_modules), config.targets)
        return self._add_store(name, config, sites)

    def _add_store(self, name: str, config: PrefixConfig, sites: list[Site]) -> PrefixStore:
        if not name or "." in name:
            raise ValueError(f"prefix names must be non-empty and hold no dots, got {name!r}")
        if name in self.prefixes:
            raise ValueError(f"a prefix named {name!r} already exists; delete_prefix({name!r}) first")
        modules = dict(self.base_model.named_modules())
        devices = {s.name: _module_device(modules[s.name]) for s in sites}
        store = PrefixStore(config, sites, devices)
        for site in sites:
            if site.name not in self._installed:
                install(modules[site.name], site, self._lookup)
                self._installed[site.name] = site
        self.prefixes[name] = store
        if config.position_offset and self._position_hook is None:
            self._position_hook = self.base_model.register_forward_pre_hook(self._shift_positions, with_kwargs=True)
        if self.active_prefix is None:
            self.active_prefix = name
        return store

    def set_prefix(self, name: str | None) -> None:
        """Make ``name`` the prefix every call uses (None: the base model)."""
        if name is not None and name not in self.prefixes:
            raise ValueError(f"unknown prefix {name!r}; prefixes: {list(self.prefixes)}")
        self.active_prefix = name

    def _lookup(self, site_name: str, batch_size: int) -> Prefix | None:
        if self._disabled or self.active_prefix is None:
            return None
        return self.prefixes[self.active_prefix].prefix(site_name)

    def _shift_positions(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        """Forward pre-hook for prefixes with ``position_offset`` (PEFT's convention): real tokens start at P."""
        if self._disabled or self.active_prefix is None:
            return None
        config = self.prefixes[self.active_prefix].config
        if not config.position_offset:
            return None
        kwargs["position_ids"] = shifted_positions(self.base_model, args, kwargs, config.num_virtual_tokens)
        return args, kwargs

    @contextlib.contextmanager
    def disable_prefix(self) -> Iterator[None]:
        """Inside this context the model behaves exactly as the original model."""
        previous, self._disabled = self._disabled, True
        try:
            yield
        finally:
            self._disabled = previous

    def remove_prefix(self) -> nn.Module:
        """Take every prefix out and give back the original model, with its requires_grad flags restored."""
        modules = dict(self.base_model.named_modules())
        for site_name in self._installed:
            uninstall(modules[site_name])
        self._installed.clear()
        if self._position_hook is not None:
            self._position_hook.remove()
            self._position_hook = None
        self.prefixes.clear()
        self.active_prefix = None
        for n, p in self.base_model.named_parameters():
            p.requires_grad_(self._base_requires_grad.get(n, p.requires_grad))
        return self.base_model

    # -- training helpers -------------------------------------------------------------------------------
    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """(trainable, total) parameter counts, the base model's included in the total."""
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        total = sum(p.numel() for p in self.parameters())
        return trainable, total

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        print(f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {100 * trainable / total:.4f}")

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None) -> None:
        """Activation checkpointing on the base model, non-reentrant by default.

        Non-reentrant checkpointing does not need the inputs to require grad, so the input-grad hook that
        transformers adds is removed: it breaks BLIP, whose embeddings are updated in place.
        """
        kwargs = {"use_reentrant": False, **(gradient_checkpointing_kwargs or {})}
        base = self.base_model
        if hasattr(base, "activation_checkpointing_enable"):
            base.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        if not kwargs["use_reentrant"] and hasattr(base, "_require_grads_hook"):
            base.disable_input_require_grads()

    # -- saving -----------------------------------------------------------------------------------------
    def save_prefix(self, directory: str | os.PathLike, name: str | None = None) -> None:
        """Write ``prefix_config.json`` and ``prefix.safetensors`` for one prefix (default: the active one)."""
        name = name or self.active_prefix
        if name not in self.prefixes:
            raise ValueError(f"unknown prefix {name!r}; prefixes: {list(self.prefixes)}")
        store = self.prefixes[name]
        config = getattr(self.base_model, "config", None)
        meta = {
            "name": name,
            "prefix_config": store.config.to_dict(),
            "model": {
                "architecture": type(self.base_model).__name__,
                "model_type": getattr(config, "model_type", None),
                "name_or_path": getattr(config, "_name_or_path", None) or None,
            },
            "sites": [site.to_dict() for site in store.sites],
        }
        checkpoint.write_prefix(directory, store.tensors(), meta)

    def load_prefix(self, name: str, directory: str | os.PathLike) -> PrefixStore:
        """Add a prefix saved with ``save_prefix`` (or a PEFT prefix-tuning adapter) under ``name``."""
        config, sites, tensors = _read_for(self.base_model, directory)
        store = self._add_store(name, config, sites)
        store.load_tensors(tensors)
        return store


def _module_device(module: nn.Module) -> torch.device | None:
    for tensor in module.parameters():
        return tensor.device if tensor.device.type != "meta" else None
    return None


def add_prefix(model: nn.Module, config: PrefixConfig | None = None, name: str = "default") -> PrefixModel:
    """Freeze ``model`` and put a trainable prefix into its attention sites (all of them by default)."""
    return PrefixModel(model, config or PrefixConfig(), name=name)


def load_prefix(model: nn.Module, directory: str | os.PathLike, name: str = "default") -> PrefixModel:
    """Wrap ``model`` with the prefix saved in ``directory`` (mmprefix or PEFT prefix-tuning format)."""
    wrapped = model if isinstance(model, PrefixModel) else PrefixModel(model)
    wrapped.load_prefix(name, directory)
    return wrapped


def _describe(model: nn.Module) -> str:
    config = getattr(model, "config", None)
    return f"{type(model).__name__} (model_type={getattr(config, 'model_type', None)!r})"


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


def _read_for(model: nn.Module, directory: str | os.PathLike) -> tuple[PrefixConfig, list[Site], dict[str, torch.Tensor]]:
    """Read a prefix folder and check it fits ``model``: (config, the model's sites, tensors by those sites)."""
    if checkpoint.detect_format(directory) == "peft":
        return read_peft_prefix(model, directory)
    meta, saved_tensors = checkpoint.read_prefix(directory)
    config = PrefixConfig.from_dict(meta["prefix_config"])
    saved_model = meta.get("model", {})
    origin = (
        f"the prefix in {directory} was saved for {saved_model.get('architecture')} "
        f"(model_type={saved_model.get('model_type')!r})"
    )
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
    tensors = {}
    for entry, site in zip(meta["sites"], sites):
        for part in ("key", "value"):
            tensor = saved_tensors.get(f"{entry['name']}.{part}")
            shape = (site.kv_heads, config.num_virtual_tokens, site.head_dim)
            if tensor is None or tuple(tensor.shape) != shape:
                got = None if tensor is None else tuple(tensor.shape)
                raise ValueError(f"{directory}: tensor {entry['name']}.{part} has shape {got}, expected {shape}")
            tensors[f"{site.name}.{part}"] = tensor
    return config, sites, tensors
