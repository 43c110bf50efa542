"""`PrefixConfig`: what a prefix is and where it goes."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from . import typed


# PrefixConfig.method: keys and values in attention, a soft prompt, or a memory read outside the softmax
INJECTIONS = ("prefix", "prompt", "memory")
INITS = ("random", "zero", "text")
REPARAMS = (None, "mlp")
GATES = (None, "scalar", "head")
CONDITIONS = (None, "image")


@dataclass
class PrefixConfig:
    """Configuration of one prefix.

    Args:
        num_virtual_tokens: number of prefix key/value slots ``P`` prepended in every targeted attention site
            (for ``method="prompt"``: the number of soft-prompt tokens).
        method: ``"prefix"`` (keys and values inside attention), ``"memory"`` or ``"prompt"``. ``"memory"``: a
            decoupled prefix (Prefix-Tuning+, Wang et al., 2025): each site adds to its attention output a read of
            ``num_virtual_tokens`` trainable memory slots (keys and values) by the query through the feature map
            ``elu(x) + 1``, normalised over the slots, outside the softmax, so a long input never dilutes it
            (``mmprefix.core.attention.memory``); its values start at zero, so it starts as the base model (to
            float rounding on BLIP's and GIT's hand-written attention, exactly elsewhere).
            ``"prompt"``: a soft prompt of ``num_virtual_tokens`` trainable input embeddings inserted into the
            model's text input (Lester et al., 2021), for comparison; ``"text"`` init then starts from the
            embeddings of ``init_text``.
        targets: which attention sites get a prefix, as ``"tower.kind[layers]"`` strings, e.g. ``"vision"``,
            ``"lm.self"``, ``"qformer.cross"``, ``"text_decoder.*[6:]"``, ``"*.cross[-2:]"``. ``tower`` and ``kind``
            accept ``*``; the optional ``[start:stop]`` slice selects layers of that tower (negative indices count
            from the last layer). ``None`` (the default) targets every supported site. ``PrefixModel`` lists the
            valid towers and kinds of a model in the error when a target matches nothing.
        target_modules: regular expressions on module names (``re.fullmatch``) selecting attention modules
            directly. Needed for models outside the supported families (their attention must go through
            transformers' attention interface); combined with ``targets`` by intersection.
        init: how the prefix starts. ``"random"``: normal with ``init_std``; ``"zero"``: keys and values zero (a
            near no-op start); ``"text"``: the frozen model's own keys and values for ``init_text`` at each site
            (vision sites see ``init_image``, or a plain grey image), repeated or cut to ``P`` tokens; needs the
            model's processor or tokenizer (``add_prefix(..., processor=...)``).
        init_std: standard deviation of the ``"random"`` initialisation (``method="memory"``: of the memory keys;
            keys of nearly equal size read every slot alike, so give memory keys ``init_std`` near 1, or use
            ``init="text"``).
        init_text: the text for ``init="text"``.
        init_image: path of the image for ``init="text"`` on models with a vision input.
        reparam: ``None`` (flat keys and values) or ``"mlp"``: during training the prefix is produced by an
            embedding and a two-layer MLP (Li & Liang, 2021). Saving writes the flat keys and values.
        reparam_hidden: width of the reparameterisation MLP.
        gate: ``None``, ``"scalar"`` or ``"head"``: a zero-initialised gate per site (one value, or one per query
            head) that scales a separately normalised prefix attention added to the original attention, as in
            LLaMA-Adapter; with the gate at zero the model equals the base model (as an empty memory does).
        position_offset: shift real-token position ids by ``P`` (what PEFT's prefix tuning does implicitly,
            because it passes the prefix as a KV cache). Set automatically when loading a PEFT adapter; leave
            ``False`` for prefixes trained with mmprefix.
        condition: ``None`` or ``"image"``: an image-conditioned prefix (CoCoOp's idea in every layer). A small
            meta-network maps each image's pooled features, from the frozen vision tower (run once per call,
            without prefixes), to a per-sample shift of the prefix's keys and values at every site outside the
            vision towers (whose own prefix cannot depend on their output); its last layer starts at zero, so the
            prefix starts unconditioned. Calls must pass their images (``mmprefix.core.conditioning``).
        condition_hidden: width of the meta-network's hidden layer.
    """

    num_virtual_tokens: int = 16
    method: str = "prefix"
    targets: list[str] | str | None = None
    target_modules: list[str] | str | None = None
    init: str = "random"
    init_std: float = 0.02
    init_text: str | None = None
    init_image: str | None = None
    reparam: str | None = None
    reparam_hidden: int = 512
    gate: str | None = None
    position_offset: bool = False
    condition: str | None = None
    condition_hidden: int = 32

    def __post_init__(self) -> None:
        if isinstance(self.targets, str):
            self.targets = [self.targets]
        if isinstance(self.target_modules, str):
            self.target_modules = [self.target_modules]
        if not isinstance(self.num_virtual_tokens, int) or self.num_virtual_tokens < 0:
            raise ValueError(f"num_virtual_tokens must be an integer >= 0, got {self.num_virtual_tokens!r}")
        if self.init_std < 0:
            raise ValueError(f"init_std must be >= 0, got {self.init_std}")
        choices = {
            "method": (INJECTIONS, self.method),
            "init": (INITS, self.init),
            "reparam": (REPARAMS, self.reparam),
            "gate": (GATES, self.gate),
            "condition": (CONDITIONS, self.condition),
        }
        for field, (allowed, value) in choices.items():
            if value not in allowed:
                raise ValueError(f"{field} must be one of {allowed}, got {value!r}")
        if self.init == "text" and not self.init_text:
            raise ValueError('init="text" needs the text: PrefixConfig(init="text", init_text="...")')
        if self.method == "prompt":
            set_options = [f for f in ("targets", "target_modules", "reparam", "gate") if getattr(self, f) is not None]
            if set_options or self.position_offset:
                raise ValueError(f'method="prompt" puts the prompt in the text input; it takes no {set_options or "position_offset"}')
        if self.method == "memory" and (self.gate is not None or self.position_offset):
            raise ValueError('method="memory" reads its memory outside the softmax already; it takes no gate and no '
                             "position_offset (those are options of method=\"prefix\")")
        if self.condition is not None and self.method == "prompt":
            raise ValueError('condition="image" shifts the keys and values of a prefix (method="prefix" or "memory"), '
                             'not a soft prompt')
        if self.reparam_hidden < 1 or self.condition_hidden < 1:
            raise ValueError(f"reparam_hidden and condition_hidden must be >= 1, got {self.reparam_hidden}, "
                             f"{self.condition_hidden}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Any, source: str = "", path: str = "") -> PrefixConfig:
        """A config from parsed JSON or YAML, every field checked against its type; a ``ValueError`` names
        ``source``, the field and what was expected (e.g. ``num_virtual_tokens must be an integer``)."""
        return typed.build(cls, data, source, path)
