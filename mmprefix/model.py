"""`PrefixModel`: a frozen model with named prefixes in its attention sites; `add_prefix`, `load_prefix`."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

from . import checkpoint
from .architectures import Site, find_sites, prompt_input, select_sites, unreachable_towers
from .config import PrefixConfig
from .init import activation_inputs
from .layer import Prefix, install, uninstall
from .peft_compat import read_peft_prefix, shifted_positions
from .prefix import PrefixStore
from .prompt import Insertion, PromptStore, insert_prompts, remove_placeholders, replace_placeholders
from .routing import Routing


# Inputs whose first dimension is the batch, to check a routing list before any compute.
BATCH_INPUTS = ("input_ids", "pixel_values", "inputs_embeds", "attention_mask")
# Methods other than forward/generate that read text ids: called on the wrapper, they get the soft prompt too
# (zero-shot classification and retrieval encode class prompts and captions with them).
TEXT_METHODS = ("get_text_features",)
_ACTIVE = object()  # no per-call routing: use the active prefix


class PrefixModel(nn.Module):
    """Wraps a model, freezes every base parameter and routes named prefixes into its attention sites.

    The wrapped model is modified in place (its targeted attention modules look up the current prefix), so
    calling it directly also uses the active prefix. ``forward``, ``generate`` and every other attribute are
    delegated to it; ``forward`` and ``generate`` also take ``prefix=``: one name (or None for the base model)
    for the whole batch, or a list with one name per row. Use `add_prefix` to build one.
    """

    def __init__(self, model: nn.Module, config: PrefixConfig | None = None, name: str = "default") -> None:
        super().__init__()
        if isinstance(model, PrefixModel):
            raise ValueError("model is already a PrefixModel; use its add_prefix() method to add another prefix")
        self.base_model = model
        self.prefixes = nn.ModuleDict()
        self.active_prefix: str | None = None
        self.capturing = False
        self._captured: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._route: Any = _ACTIVE
        self._disabled = False
        self._installed: dict[str, Site] = {}
        self._position_hook = None
        self._prompt_hook = None
        self._checkpoint_wired = False
        self._insertion: Insertion | None = None
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
            attribute = getattr(self.base_model, name)
            if name in TEXT_METHODS:
                return functools.partial(self._call_with_prompts, attribute)
            return attribute

    def _call_with_prompts(self, method: Any, *args: Any, **kwargs: Any) -> Any:
        with self._routing(_ACTIVE, args, kwargs, generating=False) as kwargs:
            return method(*args, **kwargs)

    def forward(self, *args: Any, prefix: Any = _ACTIVE, **kwargs: Any) -> Any:
        with self._routing(prefix, args, kwargs, generating=False) as kwargs:
            return self.base_model(*args, **kwargs)

    def generate(self, *args: Any, prefix: Any = _ACTIVE, **kwargs: Any) -> Any:
        """``generate`` of the wrapped model; with a routing list, each sample keeps its prefix across beams.
        Returned sequences never show a soft prompt's placeholder tokens."""
        with self._routing(prefix, args, kwargs, generating=True) as kwargs:
            output, insertion = self.base_model.generate(*args, **kwargs), self._insertion
        if insertion is None:
            return output
        if torch.is_tensor(output):
            return remove_placeholders(insertion, output)
        output.sequences = remove_placeholders(insertion, output.sequences)
        return output

    # -- prefixes ---------------------------------------------------------------------------------------
    @property
    def sites(self) -> list[Site]:
        """Attention sites that carry a prefix: name, tower, kind, layer, heads, kv_heads, head_dim."""
        return list(self._installed.values())

    def add_prefix(self, name: str, config: PrefixConfig, processor: Any = None) -> PrefixStore | PromptStore:
        """Add a new named prefix; the first one added becomes active. ``processor`` (or tokenizer) is needed
        for ``init="text"``, which runs the frozen model once to read its own keys and values (for a soft
        prompt: embeds the text)."""
        if config.init == "text" and processor is None:
            raise ValueError('init="text" needs the model\'s processor or tokenizer: add_prefix(..., processor=...)')
        sites = []
        if config.method == "prefix":
            available = find_sites(self.base_model, config.target_modules)
            if not config.target_modules:
                _check_reachable(self.base_model, available, config.targets)
            sites = select_sites(available, config.targets)
        store = self._add_store(name, config, sites)
        if config.init == "text":
            try:
                if config.method == "prompt":
                    store.load_tensors({"prompt.embeddings": self._text_embeddings(config, processor)})
                else:
                    store.set_kv(self._activations(store, processor))
            except BaseException:
                self.delete_prefix(name)
                raise
        return store

    def _add_store(self, name: str, config: PrefixConfig, sites: list[Site]) -> PrefixStore | PromptStore:
        if not name or "." in name:
            raise ValueError(f"prefix names must be non-empty and hold no dots, got {name!r}")
        if name in self.prefixes:
            raise ValueError(f"a prefix named {name!r} already exists; delete_prefix({name!r}) first")
        if config.method == "prompt":
            where = prompt_input(self.base_model)
            store = PromptStore(config, where.embedding.embedding_dim, _module_device(where.embedding))
            if self._prompt_hook is None:
                self._prompt_hook = where.embedding.register_forward_hook(self._embed_prompt)
        else:
            store = PrefixStore(config, sites, self._devices(sites))
        modules = dict(self.base_model.named_modules())
        for site in sites:
            if site.name not in self._installed:
                install(modules[site.name], site, self)
                self._installed[site.name] = site
        self.prefixes[name] = store
        if config.position_offset and self._position_hook is None:
            self._position_hook = self.base_model.register_forward_pre_hook(self._shift_positions, with_kwargs=True)
        if self.active_prefix is None:
            self.active_prefix = name
        return store

    def delete_prefix(self, name: str) -> None:
        """Remove a named prefix; attention sites that no other prefix uses get their original code back."""
        self._check_names([name])
        del self.prefixes[name]
        used = {site.name for store in self.prefixes.values() for site in store.sites}
        modules = dict(self.base_model.named_modules())
        for site_name in [n for n in self._installed if n not in used]:
            uninstall(modules[site_name])
            del self._installed[site_name]
        if self._position_hook is not None and not any(s.config.position_offset for s in self.prefixes.values()):
            self._position_hook.remove()
            self._position_hook = None
        if self._prompt_hook is not None and not any(s.config.method == "prompt" for s in self.prefixes.values()):
            self._prompt_hook.remove()
            self._prompt_hook = None
        if self.active_prefix == name:
            self.active_prefix = next(iter(self.prefixes), None)

    def set_prefix(self, name: str | None) -> None:
        """Make ``name`` the prefix every call uses (None: the base model)."""
        self._check_names([name])
        self.active_prefix = name

    def merge_reparam(self, name: str | None = None) -> PrefixStore:
        """Replace a reparameterised prefix by the flat keys and values its MLP produces (same outputs)."""
        name = name or self.active_prefix
        self._check_names([name])
        store = self.prefixes[name]
        if store.config.reparam is None:
            return store
        flat = PrefixStore(dataclasses.replace(store.config, reparam=None), store.sites, self._devices(store.sites))
        flat.load_tensors(store.tensors())
        self.prefixes[name] = flat
        return flat

    def _devices(self, sites: list[Site]) -> dict[str, torch.device | None]:
        """Each site's parameters live where its attention module does (models spread over devices)."""
        return {site.name: _module_device(self.base_model.get_submodule(site.name)) for site in sites}

    def _check_names(self, names: list[str | None]) -> None:
        unknown = [n for n in names if n is not None and n not in self.prefixes]
        if unknown:
            raise ValueError(f"unknown prefix {unknown[0]!r}; this model has {sorted(self.prefixes)}")

    @contextlib.contextmanager
    def _routing(self, prefix: Any, args: tuple, kwargs: dict, generating: bool | None) -> Iterator[dict]:
        """Use ``prefix`` (a name, None, or one name per row) for one call; yields the call's keyword
        arguments, with placeholders inserted when the call uses soft prompts (``generating=None``: a scope
        around several calls, each of which inserts its own)."""
        route: Any = self._route
        if prefix is not _ACTIVE:
            route = self._resolve(prefix, args, kwargs)
            self._check_checkpointing()
        previous, self._route = self._route, route
        previous_insertion = self._insertion
        try:
            if generating is not None:
                kwargs, self._insertion = self._insert_prompts(kwargs, generating)
            yield kwargs
        finally:
            self._route, self._insertion = previous, previous_insertion

    @contextlib.contextmanager
    def using(self, prefix: str | None | Sequence[str | None]) -> Iterator[None]:
        """Route every call inside to ``prefix`` (a name, None, or one name per row), e.g. for methods that
        are not ``forward``/``generate``: ``with model.using(["a", "b"]): model.encode_image(images)``."""
        with self._routing(prefix, (), {}, generating=None):
            yield

    def _check_checkpointing(self) -> None:
        """Checkpointed layers recompute in backward, after a per-call choice of prefixes has ended; only
        ``gradient_checkpointing_enable`` of this wrapper brings that choice back for the recomputation (for
        transformers models; open_clip checkpoints with no hook for it)."""
        base = self.base_model
        flag = "is_activation_checkpointing" if hasattr(type(base), "is_activation_checkpointing") else "is_gradient_checkpointing"
        checkpointing = getattr(base, flag, False) or any(getattr(m, "grad_checkpointing", False) for m in base.modules())
        if self.training and torch.is_grad_enabled() and checkpointing and not self._checkpoint_wired:
            raise ValueError(
                "with this gradient checkpointing, per-call prefixes and disable_prefix() would be lost when layers "
                "are recomputed in backward; enable it with PrefixModel.gradient_checkpointing_enable() "
                "(transformers models), or choose the prefix with set_prefix() before the step"
            )

    def _resolve(self, prefix: Any, args: tuple, kwargs: dict) -> Any:
        if prefix is None or isinstance(prefix, str):
            self._check_names([prefix])
            return prefix
        names = list(prefix)
        self._check_names(names)
        sizes = {v.shape[0] for k, v in kwargs.items() if k in BATCH_INPUTS and torch.is_tensor(v)}
        sizes |= {a.shape[0] for a in args if torch.is_tensor(a) and a.dim() > 0}
        if sizes and len(names) not in sizes:
            raise ValueError(f"the routing list has {len(names)} entries but the batch has {sorted(sizes)} rows")
        used = {n for n in names if n is not None}
        if len(set(names)) == 1:
            return names[0]
        if any(self.prefixes[n].config.position_offset for n in used):
            raise ValueError("prefixes with position_offset (PEFT adapters) cannot be mixed with others in one batch")
        if len({self.prefixes[n].config.method for n in used}) > 1:
            raise ValueError(f"soft prompts and prefixes cannot share a batch (routing {sorted(used)})")
        return Routing(names, self.prefixes)

    def _insert_prompts(self, kwargs: dict, generating: bool) -> tuple[dict, Insertion | None]:
        route = self.active_prefix if self._route is _ACTIVE else self._route
        if self._disabled or route is None or self._prompt_hook is None:
            return kwargs, None
        names = route.names if isinstance(route, Routing) else [route] * _batch_size(kwargs)
        stores = [None if n is None else self.prefixes[n] for n in names]
        if not any(isinstance(s, PromptStore) for s in stores):
            return kwargs, None
        where = prompt_input(self.base_model)
        if where.positions == "fixed" and len({0 if s is None else s.num_virtual_tokens for s in stores}) > 1:
            raise ValueError(
                f"{type(self.base_model).__name__} numbers its text positions by index alone, so soft prompts of "
                "different lengths (or rows without one) cannot share a batch; route them in separate calls"
            )
        prompts = [None if s is None else s.embeddings for s in stores]
        return insert_prompts(kwargs, prompts, where, explicit_positions=not generating and where.positions == "ids")

    def _embed_prompt(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
        """Forward hook on the token embedding: soft-prompt vectors into the placeholder slots."""
        if self._insertion is None or not args:
            return None
        return replace_placeholders(self._insertion, args[0], output)

    def _text_embeddings(self, config: PrefixConfig, processor: Any) -> torch.Tensor:
        """Embeddings of ``init_text``'s tokens, cycled to P: the soft prompt's text initialisation."""
        embedding = prompt_input(self.base_model).embedding
        ids = processor(text=config.init_text, return_tensors="pt")["input_ids"].to(embedding.weight.device)
        with torch.no_grad():
            vectors = embedding(ids)[0]
        return vectors[torch.arange(config.num_virtual_tokens) % vectors.shape[0]].float()

    def prefix_for(self, site_name: str, batch_size: int) -> Prefix | None:
        """What an attention site uses in the current call (see `mmprefix.layer.PrefixSource`)."""
        route = self.active_prefix if self._route is _ACTIVE else self._route
        if self._disabled or route is None:
            return None
        if isinstance(route, Routing):
            return route.prefix(site_name, batch_size)
        return self.prefixes[route].prefix(site_name)

    def observe(self, site_name: str, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Record a site's own keys and values while ``capturing`` (first call, first row)."""
        self._captured.setdefault(site_name, (keys[0].detach(), values[0].detach()))

    def _activations(self, store: PrefixStore, processor: Any) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """The frozen model's keys and values for ``init_text`` at each of the store's sites, cycled to P."""
        config = store.config
        inputs = activation_inputs(self.base_model, processor, config.init_text, config.init_image)
        self.capturing, self._captured = True, {}
        try:
            with torch.no_grad(), self._routing(None, (), {}, generating=False):
                self.base_model(**inputs)
            captured = self._captured
        finally:
            self.capturing, self._captured = False, {}
        missing = [s.name for s in store.sites if s.name not in captured]
        if missing:
            raise ValueError(f'init="text" reached no activations at {len(missing)} sites (e.g. {missing[0]})')
        slots = torch.arange(config.num_virtual_tokens)
        return {
            name: (keys[:, slots % keys.shape[1]], values[:, slots % values.shape[1]])
            for name, (keys, values) in captured.items()
            if store.has_site(name)
        }

    def _shift_positions(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        """Forward pre-hook for prefixes with ``position_offset`` (PEFT's convention): real tokens start at P."""
        route = self.active_prefix if self._route is _ACTIVE else self._route
        if self._disabled or not isinstance(route, str):
            return None
        config = self.prefixes[route].config
        if not config.position_offset:
            return None
        kwargs["position_ids"] = shifted_positions(self.base_model, args, kwargs, config.num_virtual_tokens)
        return args, kwargs

    @contextlib.contextmanager
    def disable_prefix(self) -> Iterator[None]:
        """Inside this context the model behaves exactly as the original model."""
        self._check_checkpointing()
        previous, self._disabled = self._disabled, True
        try:
            yield
        finally:
            self._disabled = previous

    def remove_prefix(self) -> nn.Module:
        """Take every prefix out and give back the original model, with its requires_grad flags restored."""
        for name in list(self.prefixes):
            self.delete_prefix(name)
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

        Layers are recomputed during backward, after the call that chose the prefixes has returned; the
        checkpoint's ``context_fn`` restores that call's routing for the recomputation. Non-reentrant
        checkpointing does not need the inputs to require grad, so the input-grad hook that transformers adds
        is removed: it breaks BLIP, whose embeddings are updated in place.
        """
        kwargs = {"use_reentrant": False, **(gradient_checkpointing_kwargs or {})}
        base = self.base_model
        if hasattr(base, "set_grad_checkpointing"):  # open_clip: its own non-reentrant checkpoint calls
            base.set_grad_checkpointing(True)
            return
        self._checkpoint_wired = not kwargs["use_reentrant"]
        if self._checkpoint_wired:
            kwargs.setdefault("context_fn", self._recompute_context)
        if hasattr(base, "activation_checkpointing_enable"):
            base.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        if not kwargs["use_reentrant"] and hasattr(base, "_require_grads_hook"):
            base.disable_input_require_grads()

    def _recompute_context(self) -> tuple[contextlib.AbstractContextManager, contextlib.AbstractContextManager]:
        """For torch.utils.checkpoint: nothing in forward; in the recomputation, this moment's routing."""
        state = (self.active_prefix if self._route is _ACTIVE else self._route, self._disabled)

        @contextlib.contextmanager
        def recompute() -> Iterator[None]:
            saved, (self._route, self._disabled) = (self._route, self._disabled), state
            try:
                yield
            finally:
                self._route, self._disabled = saved

        return contextlib.nullcontext(), recompute()

    # -- saving -----------------------------------------------------------------------------------------
    def save_prefix(self, directory: str | os.PathLike, name: str | None = None, keep_reparam: bool = False) -> None:
        """Write ``prefix_config.json`` and ``prefix.safetensors`` for one prefix (default: the active one).

        A reparameterised prefix is saved as the flat keys and values its MLP produces; ``keep_reparam=True``
        also keeps the embedding and MLP, to resume training it."""
        name = name or self.active_prefix
        self._check_names([name])
        store = self.prefixes[name]
        saved_config, tensors = store.config, store.tensors()
        if store.config.reparam is not None:
            if keep_reparam:
                tensors.update({f"reparam.{k}": v for k, v in store.reparam_tensors().items()})
            else:
                saved_config = dataclasses.replace(saved_config, reparam=None)
        config = getattr(self.base_model, "config", None)
        meta = {
            "name": name,
            "prefix_config": saved_config.to_dict(),
            "model": {
                "architecture": type(self.base_model).__name__,
                "model_type": getattr(config, "model_type", None),
                "name_or_path": getattr(config, "_name_or_path", None) or None,
            },
            "sites": [site.to_dict() for site in store.sites],
        }
        checkpoint.write_prefix(directory, tensors, meta)

    def load_prefix(self, name: str, directory: str | os.PathLike) -> PrefixStore:
        """Add a prefix saved with ``save_prefix`` (or a PEFT prefix-tuning adapter) under ``name``."""
        config, sites, tensors = _read_for(self.base_model, directory)
        store = self._add_store(name, config, sites)
        store.load_tensors(tensors)
        return store


def _check_reachable(model: nn.Module, sites: list[Site], targets: list[str] | None) -> None:
    """A tower mmprefix cannot reach is an error when the prefix asks for it (or for everything)."""
    from fnmatch import fnmatchcase

    missing = unreachable_towers(model, sites)
    wanted = [t for t in missing if targets is None or any(fnmatchcase(t, x.split(".")[0].split("[")[0]) for x in targets)]
    if wanted:
        reachable = sorted({s.tower for s in sites})
        raise ValueError(
            f"the {', '.join(f'{t!r} tower ({missing[t]})' for t in wanted)} of {type(model).__name__} has no "
            f"attention mmprefix can reach; target the others explicitly, e.g. targets={reachable}"
        )


def _batch_size(kwargs: dict) -> int:
    ids = kwargs.get("input_ids")
    if ids is None:
        raise ValueError('method="prompt" needs input_ids in the call (the prompt goes into the text input)')
    return ids.shape[0]


def _module_device(module: nn.Module) -> torch.device | None:
    for tensor in module.parameters():
        return tensor.device if tensor.device.type != "meta" else None
    return None


def add_prefix(
    model: nn.Module, config: PrefixConfig | None = None, name: str = "default", processor: Any = None
) -> PrefixModel:
    """Freeze ``model`` and put a trainable prefix into its attention sites (all of them by default).
    ``processor`` (or a tokenizer) is needed only for ``PrefixConfig(init="text")``."""
    wrapped = PrefixModel(model)
    wrapped.add_prefix(name, config or PrefixConfig(), processor=processor)
    return wrapped


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
