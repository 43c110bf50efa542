"""`PrefixModel`: a frozen model with named prefixes in its attention sites; `add_prefix`, `load_prefix`."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import threading
import weakref
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

from . import conditioning, media, routing, saving, text_init
from .architectures import Site, check_reachable, find_sites, is_open_clip, tower_layout
from .targets import select_sites
from .attention import Prefix, install, uninstall
from .config import PrefixConfig
from .devices import execution_device
from .peft_compat import shifted_positions
from .prompt import PromptStore, SoftPrompts, remove_placeholders
from .routing import ACTIVE, Call, Routing
from .signature import Forward
from .store import PrefixStore

# Methods other than forward/generate that read text ids: called on the wrapper, they get the soft prompt too
# (zero-shot classification and retrieval encode class prompts and captions with them).
TEXT_METHODS = ("get_text_features",)


def check_prefix_name(name: str) -> str:
    """``name`` if it can name a prefix: non-empty, no dots, and not an attribute of ``nn.ModuleDict`` (the
    prefixes are registered as submodules, so "half" or "train" would shadow a method)."""
    if not isinstance(name, str) or not name or "." in name:
        raise ValueError(f"prefix names must be non-empty strings and hold no dots, got {name!r}")
    if hasattr(nn.ModuleDict, name) or name in nn.ModuleDict().__dict__:
        raise ValueError(f"{name!r} cannot name a prefix: it is an attribute of torch's nn.ModuleDict; choose another name")
    return name


class PrefixModel(nn.Module):
    """Wraps a model, freezes every base parameter and routes named prefixes into its attention sites.

    The wrapped model is modified in place (its targeted attention modules look up the current prefix), so
    calling it directly also uses the active prefix. ``forward``, ``generate`` and every other attribute are
    delegated to it; ``forward`` and ``generate`` also take ``prefix=``: one name (or None for the base model)
    for the whole batch, or a list with one name per row. The routing of a call belongs to that call alone:
    threads and asyncio tasks may call one model with different prefixes at once. Use `add_prefix` to build one.
    """

    def __init__(self, model: nn.Module, config: PrefixConfig | None = None, name: str = "default") -> None:
        super().__init__()
        if isinstance(model, PrefixModel):
            raise ValueError("model is already a PrefixModel; use its add_prefix() method to add another prefix")
        self.base_model = model
        self.prefixes = nn.ModuleDict()
        self.active_prefix: str | None = None
        self._installed: dict[str, Site] = {}
        self._position_hook = None
        self._soft_prompts: SoftPrompts | None = None
        self._checkpoint_wired = False
        self._layout = tower_layout(model)
        self._family = self._layout.family if self._layout is not None else None
        self._media_sites: dict[str, str] = {}  # site name -> tower, for sites that see images instead of rows
        # module name -> (forward pre-hook, its tower, whether it is a site's): packed and multi-input towers
        self._hooks: dict[str, tuple[Any, str, bool]] = {}
        self._base_requires_grad = {n: p.requires_grad for n, p in model.named_parameters()}
        # Stores handed out by `hold`: their sites stay installed while they live, whatever happens to their name.
        self._held: weakref.WeakSet[PrefixStore] = weakref.WeakSet()
        self._holding = threading.Lock()
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
        with self._call(ACTIVE, args, kwargs, generating=False) as kwargs:
            return method(*args, **kwargs)

    @Forward
    def forward(self, *args: Any, prefix: Any = ACTIVE, **kwargs: Any) -> Any:
        with self._call(prefix, args, kwargs, generating=False) as kwargs:
            return self.base_model(*args, **kwargs)

    def generate(self, *args: Any, prefix: Any = ACTIVE, **kwargs: Any) -> Any:
        """``generate`` of the wrapped model; with a routing list, each sample keeps its prefix across beams.
        Returned sequences never show a soft prompt's placeholder tokens."""
        with self._call(prefix, args, kwargs, generating=True) as kwargs:
            output, insertion = self.base_model.generate(*args, **kwargs), routing.current(self).insertion
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
        if config.method != "prompt":
            available = find_sites(self.base_model, config.target_modules)
            if not config.target_modules:
                check_reachable(self.base_model, available, config.targets)
            sites = select_sites(available, config.targets)
        store = self._new_store(name, config, sites)
        if config.init == "text":
            try:
                if config.method == "prompt":
                    embedding = self._soft_prompts.where.embedding
                    store.load_tensors({"prompt.embeddings": text_init.text_embeddings(embedding, config, processor)})
                else:
                    store.set_kv(text_init.captured_keys_values(self, store, processor))
            except BaseException:
                self.delete_prefix(name)
                raise
        return store

    def _new_store(self, name: str, config: PrefixConfig, sites: list[Site]) -> PrefixStore | PromptStore:
        check_prefix_name(name)
        if name in self.prefixes:
            raise ValueError(f"a prefix named {name!r} already exists; delete_prefix({name!r}) first")
        if config.method == "prompt":
            if self._soft_prompts is None:
                self._soft_prompts = SoftPrompts(self.base_model, lambda: routing.current(self).insertion)
            store = self._soft_prompts.new_store(config)
        else:
            width = conditioning.feature_width(self.base_model) if config.condition is not None else None
            store = PrefixStore(config, sites, self._devices(sites), condition_width=width)
        for site in sites:
            if site.name not in self._installed:
                install(self.base_model.get_submodule(site.name), site, self)
                self._installed[site.name] = site
                self._hook_media(site)
        self.prefixes[name] = store
        if config.position_offset and self._position_hook is None:
            self._position_hook = self.base_model.register_forward_pre_hook(self._shift_positions, with_kwargs=True)
        if self.active_prefix is None:
            self.active_prefix = name
        return store

    def _hook_media(self, site: Site) -> None:
        """A site in a tower that sees images: remembered for routed calls; a packed tower's attention records its
        chunks, and a tower that several inputs feed (images, then videos) records which one it runs."""
        if self._layout is None or site.tower not in self._layout.media_towers:
            return
        self._media_sites[site.name] = site.tower
        hooks = []
        if site.tower in self._family.packed:
            hooks.append((site.name, functools.partial(routing.record_chunks, self, site.name)))
        if sum(site.tower in m.towers for m in self._family.media) > 1:
            hooks.append((self._layout.root(site.name), functools.partial(routing.tower_starts, self, site.tower)))
        for module_name, hook in hooks:
            if module_name not in self._hooks:
                handle = self.base_model.get_submodule(module_name).register_forward_pre_hook(hook, with_kwargs=True)
                self._hooks[module_name] = (handle, site.tower, module_name == site.name)

    def delete_prefix(self, name: str) -> None:
        """Remove a named prefix; attention sites that no other prefix uses get their original code back."""
        routing.check_names([name], self.prefixes)
        del self.prefixes[name]
        self._release_sites()
        if self._position_hook is not None and not any(s.config.position_offset for s in self.prefixes.values()):
            self._position_hook.remove()
            self._position_hook = None
        if self._soft_prompts is not None and not any(s.config.method == "prompt" for s in self.prefixes.values()):
            self._soft_prompts.remove()
            self._soft_prompts = None
        if self.active_prefix == name:
            self.active_prefix = next(iter(self.prefixes), None)

    def hold(self, name: str | None) -> PrefixStore | None:
        """The store that serves ``name`` now (None for None), for work that must go on with it after ``name``
        is deleted or replaced (a request decoding over many calls while prefixes change): pass it as
        ``prefix=store``, or in a routing list beside names and other held stores. Its attention sites stay
        installed while the store object lives (they are taken out by the first `hold` or `delete_prefix` after
        it is gone). Soft prompts cannot be held."""
        routing.check_names([name], self.prefixes)
        store = self.prefixes[name] if name is not None else None
        if store is not None and not isinstance(store, PrefixStore):
            raise ValueError(f"{name!r} is a soft prompt (method='prompt'); only prefixes can be held")
        with self._holding:
            if store is not None:
                self._held.add(store)
        self._release_sites()
        return store

    def _release_sites(self) -> None:
        """Give attention sites that no prefix and no held store uses their original code back."""
        with self._holding:
            used = {site.name for store in [*self.prefixes.values(), *self._held] for site in store.sites}
        for site_name in [n for n in self._installed if n not in used]:
            uninstall(self.base_model.get_submodule(site_name))
            del self._installed[site_name]
            self._media_sites.pop(site_name, None)
        towers = set(self._media_sites.values())
        for module_name, (handle, tower, on_site) in list(self._hooks.items()):
            if (module_name not in self._installed) if on_site else (tower not in towers):
                handle.remove()
                del self._hooks[module_name]

    def set_prefix(self, name: str | None) -> None:
        """Make ``name`` the prefix every call uses (None: the base model)."""
        routing.check_names([name], self.prefixes)
        self.active_prefix = name

    def merge_reparam(self, name: str | None = None) -> PrefixStore:
        """Replace a reparameterised prefix by the flat keys and values its MLP produces (same outputs)."""
        name = self._named(name, "merge_reparam")
        store = self.prefixes[name]
        if store.config.reparam is None:
            return store
        width = store.condition.net[0].in_features if store.condition is not None else None
        flat = PrefixStore(dataclasses.replace(store.config, reparam=None), store.sites, self._devices(store.sites),
                           condition_width=width)
        flat.load_tensors(store.tensors())
        self.prefixes[name] = flat
        return flat

    def _devices(self, sites: list[Site]) -> dict[str, torch.device | None]:
        """Each site's parameters live where its attention module computes (models spread over devices, or
        offloaded: see `devices.execution_device`)."""
        return {site.name: execution_device(self.base_model.get_submodule(site.name)) for site in sites}

    # -- routing ----------------------------------------------------------------------------------------
    def _route(self, call: Call) -> str | None | Routing:
        """What ``call`` routes to: its own route, or the active prefix."""
        return routing.route_of(call, self.active_prefix)

    @contextlib.contextmanager
    def _call(self, prefix: Any, args: tuple, kwargs: dict, generating: bool) -> Iterator[dict]:
        """One call routed to ``prefix`` (a name, None, one name per row, or ACTIVE: the enclosing scope's or
        the active prefix); yields the call's keyword arguments, with soft-prompt placeholders inserted."""
        call = routing.current(self).open()
        if prefix is not ACTIVE:
            call.route = routing.resolve(prefix, self.prefixes, args, kwargs, self._held)
            self._check_checkpointing()
            routing.check_routable(call.route, self._family, self.base_model)
        if generating:
            call.expansion = routing.expansion(self.base_model, kwargs)
        call.route = route = self._route(call)  # the active prefix when the call starts
        call.store = self.prefixes[route] if isinstance(route, str) else route if isinstance(route, PrefixStore) else None
        if isinstance(route, Routing):
            call.media = self._call_media(route, kwargs)
        if self._soft_prompts is not None and not call.disabled and route is not None and call.store is not route:
            kwargs, call.insertion = self._soft_prompts.insert(kwargs, route, self.prefixes, generating)
        conditioned = self._conditioned(route) if not call.disabled else []
        if conditioned:  # the scope's images (conditioned_on), else the call's own; the meta-networks run now
            condition = call.condition or self._condition(args, kwargs, conditioned[0][0])
            call.condition = condition.for_stores([store for _, store in conditioned])
        with routing.inside(self, call):
            yield kwargs

    def image_conditioned(self, prefix: Any = ACTIVE) -> bool:
        """Whether a call routed to ``prefix`` (default: this moment's routing) uses an image-conditioned prefix,
        and so needs the images of its rows."""
        route = self._route(routing.current(self)) if prefix is ACTIVE else routing.resolve(prefix, self.prefixes, (), {})
        return bool(self._conditioned(route))

    def _conditioned(self, route: str | None | PrefixStore | Routing) -> list[tuple[str, PrefixStore]]:
        """The image-conditioned prefixes a route uses: (name, store) pairs (a held store is named "held")."""
        if isinstance(route, Routing):
            used = list(route.by_name.items())
        elif isinstance(route, PrefixStore):
            used = [("held", route)]
        else:
            used = [(route, self.prefixes[route])] if route is not None else []
        return [(name, store) for name, store in used if getattr(store, "condition", None) is not None]

    def _condition(self, args: tuple, kwargs: dict, name: str) -> conditioning.Condition:
        """The pooled features of the call's images for image-conditioned prefixes (``name``: one of them): the
        frozen vision tower, every prefix off, once per call."""
        images = conditioning.call_images(self.base_model, args, kwargs)
        if images is None:
            raise ValueError(f"prefix {name!r} is conditioned on images (condition='image') but this call passes "
                             "none: give it the images, or run it inside model.conditioned_on(images)")
        with routing.inside(self, dataclasses.replace(routing.current(self), disabled=True, cache=None)):
            return conditioning.Condition(conditioning.image_features(self.base_model, images))

    @contextlib.contextmanager
    def conditioned_on(self, images: torch.Tensor) -> Iterator[None]:
        """Calls inside condition their image-conditioned prefixes on ``images`` (model inputs, e.g. ``pixel_values``,
        one per row or per group of rows) instead of their own, e.g. the texts of a CLIP model:
        ``with model.conditioned_on(pixels): model.get_text_features(ids)`` (each image's texts in a row)."""
        condition = self._condition((), {"pixel_values": images, "image": images}, "the conditioned prefix")
        with routing.inside(self, dataclasses.replace(routing.current(self), condition=condition, cache=None)):
            yield

    @contextlib.contextmanager
    def using(self, prefix: str | None | Sequence[str | None]) -> Iterator[None]:
        """Route every call inside to ``prefix`` (a name, None, or one name per row), e.g. for methods that
        are not ``forward``/``generate``: ``with model.using(["a", "b"]): model.encode_image(images)``."""
        route = routing.resolve(prefix, self.prefixes, (), {}, self._held)
        self._check_checkpointing()
        routing.check_routable(route, self._family, self.base_model)
        # the scope's calls' images are not known here: only towers whose batch is the rows can be routed
        scope = dataclasses.replace(routing.current(self), route=route, cache=None,
                                    media=self._call_media(route, None) if isinstance(route, Routing) else None)
        with routing.inside(self, scope):
            yield

    def _call_media(self, route: Routing, kwargs: dict | None) -> media.CallMedia | None:
        """Which row each image (tile, frame, chunk) of a routed call belongs to, for the towers that see them
        (``kwargs`` None: a ``using()`` scope, whose calls' images are not known)."""
        if not self._media_sites:
            return None
        config = getattr(self.base_model, "config", None)
        found = media.call_media(self._family, kwargs, config, self._media_sites, len(route.names))
        if kwargs is not None:  # a scope's calls may not run the towers at all: their sites decide
            found.check([name for name in self._media_sites if route.reaches(name)], self._family)
        return found

    @contextlib.contextmanager
    def disable_prefix(self) -> Iterator[None]:
        """Inside this context the model behaves exactly as the original model."""
        self._check_checkpointing()
        with routing.inside(self, dataclasses.replace(routing.current(self), disabled=True, cache=None)):
            yield

    def prefix_for(self, site_name: str, batch_size: int) -> Prefix | None:
        """What an attention site uses in the current call (see `mmprefix.core.attention.PrefixSource`)."""
        call = routing.current(self)
        if call.disabled:
            return None
        prefix = self._prefix(call, site_name, batch_size)
        if prefix is None or call.condition is None or not conditioning.conditioned(self._installed[site_name]):
            return prefix
        return conditioning.shifted(prefix, site_name, self._row_stores(call, site_name, batch_size), call.condition)

    def _prefix(self, call: Call, site_name: str, batch_size: int) -> Prefix | None:
        if call.store is not None:
            return call.store.prefix(site_name, call.cache)
        route = self._route(call)
        if route is None:
            return None
        if isinstance(route, Routing):
            chunks = call.cache.get(("chunks", site_name)) if call.cache is not None else None
            return route.prefix(site_name, batch_size, call, next(chunks) if chunks is not None else None)
        store = route if isinstance(route, PrefixStore) else self.prefixes[route]
        return store.prefix(site_name, call.cache)

    def _row_stores(self, call: Call, site_name: str, batch_size: int) -> list[PrefixStore | None]:
        """The prefix store of each of the ``batch_size`` rows a site sees."""
        route = self._route(call)
        if isinstance(route, Routing):
            return route.row_stores(site_name, batch_size, call)
        return [call.store or self.prefixes[route]] * batch_size

    @property
    def capturing(self) -> bool:
        """True while the current call records keys and values for a text initialisation."""
        return routing.current(self).captured is not None

    def observe(self, site_name: str, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Record a site's own keys and values while ``capturing`` (first call, first row)."""
        routing.current(self).captured.setdefault(site_name, (keys[0].detach(), values[0].detach()))

    def _shift_positions(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        """Forward pre-hook for prefixes with ``position_offset`` (PEFT's convention): real tokens start at P."""
        call = routing.current(self)
        route = self._route(call)
        if call.disabled or not isinstance(route, (str, PrefixStore)):
            return None
        config = (route if isinstance(route, PrefixStore) else self.prefixes[route]).config
        if not config.position_offset:
            return None
        kwargs["position_ids"] = shifted_positions(self.base_model, args, kwargs, config.num_virtual_tokens)
        return args, kwargs

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

    def activation_checkpointing_enable(self, activation_checkpointing_kwargs: dict | None = None, **options: Any) -> None:
        """transformers' new name of `gradient_checkpointing_enable` (the one its Trainer calls first)."""
        self.gradient_checkpointing_enable(activation_checkpointing_kwargs, **options)

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None, **options: Any) -> None:
        """Activation checkpointing on the base model, non-reentrant by default; ``options`` (transformers'
        ``every_n_layers``, ``offload``) go to the base model's own method.

        Layers are recomputed during backward, after the call that chose the prefixes has returned; the
        checkpoint's ``context_fn`` restores that call's routing for the recomputation. Non-reentrant
        checkpointing does not need the inputs to require grad, so the input-grad hook that transformers adds
        is removed: it breaks BLIP, whose embeddings are updated in place.
        """
        kwargs = {"use_reentrant": False, **(gradient_checkpointing_kwargs or {})}
        base = self.base_model
        if is_open_clip(base):  # its own non-reentrant checkpoint calls, with no hook for the routing
            base.set_grad_checkpointing(True)
            return
        self._checkpoint_wired = not kwargs["use_reentrant"]
        if self._checkpoint_wired:
            kwargs.setdefault("context_fn", self._recompute_context)
        if hasattr(base, "activation_checkpointing_enable"):
            base.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs, **options)
        else:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs, **options)
        if not kwargs["use_reentrant"] and hasattr(base, "_require_grads_hook"):
            base.disable_input_require_grads()

    def _check_checkpointing(self) -> None:
        """Checkpointed layers recompute in backward, after a per-call choice of prefixes has ended; only
        ``gradient_checkpointing_enable`` of this wrapper brings that choice back for the recomputation (for
        transformers models; open_clip checkpoints with no hook for it)."""
        base = self.base_model
        if not (self.training and torch.is_grad_enabled()) or self._checkpoint_wired:
            return
        if is_open_clip(base):
            checkpointing = any(getattr(m, "grad_checkpointing", False) for m in base.modules())
        else:
            flag = "is_activation_checkpointing" if hasattr(type(base), "is_activation_checkpointing") else "is_gradient_checkpointing"
            checkpointing = getattr(base, flag, False)
        if checkpointing:
            raise ValueError(
                "with this gradient checkpointing, per-call prefixes and disable_prefix() would be lost when layers "
                "are recomputed in backward; enable it with PrefixModel.gradient_checkpointing_enable() "
                "(transformers models), or choose the prefix with set_prefix() before the step"
            )

    def _recompute_context(self) -> tuple[contextlib.AbstractContextManager, contextlib.AbstractContextManager]:
        """For torch.utils.checkpoint: nothing in forward; in the recomputation, this moment's routing."""
        call = routing.current(self)
        return contextlib.nullcontext(), routing.inside(self, dataclasses.replace(call, route=self._route(call), cache={}))

    # -- saving -----------------------------------------------------------------------------------------
    def save_prefix(self, directory: str | os.PathLike, name: str | None = None, keep_reparam: bool = False) -> None:
        """Write one prefix (default: the active one) into ``directory``: ``prefix.safetensors``, replaced in one
        atomic rename, and its readable copy ``prefix_config.json`` (see `mmprefix.core.saving`).

        A reparameterised prefix is saved as the flat keys and values its MLP produces; ``keep_reparam=True``
        also keeps the embedding and MLP, to resume training it."""
        name = self._named(name, "save_prefix")
        saving.save(directory, self.base_model, name, self.prefixes[name], keep_reparam)

    def _named(self, name: str | None, method: str) -> str:
        """``name``, or the active prefix; one line when there is neither (after ``set_prefix(None)``)."""
        name = name or self.active_prefix
        if name is None:
            raise ValueError(f"no prefix is active (set_prefix(None)); name one: {method}(..., name=...) with one of "
                             f"{sorted(self.prefixes)}")
        routing.check_names([name], self.prefixes)
        return name

    def load_prefix(self, name: str, directory: str | os.PathLike) -> PrefixStore | PromptStore:
        """Add a prefix saved with ``save_prefix`` (or a PEFT prefix-tuning adapter) under ``name``."""
        config, sites, tensors = saving.read_for(self.base_model, directory)
        store = self._new_store(name, config, sites)
        store.load_tensors(tensors)
        return store


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
