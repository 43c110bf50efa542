"""One decoding step for many rows at once, each with its own prefix, prompt length and position.

A stepper runs a model in two kinds of calls, each routed row by row (``route``: one held prefix store, or
None, per row; see `PrefixModel.hold`):

* ``prefill(inputs, route)``: requests of one kind (`inputs.Prepared.group`), their texts padded and masked:
  their first next-token logits, their cache (`CacheRows`) and the position of each row's next token;
* ``step(tokens, positions, rows, route)``: one new token per row of a running batch, at each row's own
  position, over the left-padded cache, masked; the logits and the cache one column longer.

`CausalStepper`: decoder-only language models and the vision-language models that put image tokens into one
(LLaVA and other chat-template VLMs, through their own ``forward``). `BlipStepper`: BLIP's text decoder, whose
cross-attention reads each row's own image (captions) or question (VQA) states, padded and masked.

`stepper_for` picks one, or says why a model cannot step (the engine then runs it request by request).
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

import torch
from transformers.cache_utils import DynamicCache, EncoderDecoderCache
from transformers.pytorch_utils import apply_chunking_to_forward

from ..core.architectures import unwrap
from ..data.formats import prompt_format
from ..core.model import PrefixModel
from ..core.store import PrefixStore
from .cache_rows import CacheRows, from_cache, start_rows, to_cache
from .inputs import padded_batch

Route = Sequence[PrefixStore | None]
# Generation-config fields whose defaults leave greedy decoding alone; a model that sets one to something else
# needs transformers' own logits processors, which only request-level batching (generate) applies.
NEUTRAL_GENERATION = {
    "repetition_penalty": 1.0, "no_repeat_ngram_size": 0, "encoder_no_repeat_ngram_size": 0, "min_length": 0,
    "min_new_tokens": None, "bad_words_ids": None, "suppress_tokens": None, "begin_suppress_tokens": None,
    "forced_bos_token_id": None, "forced_eos_token_id": None, "sequence_bias": None, "exponential_decay_length_penalty": None,
    "renormalize_logits": False, "guidance_scale": None, "do_sample": False,
}


def _route(route: Route) -> Any:
    """One entry for a batch of one prefix (the call then runs as it does for a lone request), else the list."""
    return route[0] if len({id(entry) for entry in route}) == 1 else list(route)


class CausalStepper:
    """Steps a decoder-only model (see the module docstring); ``eos``: the token ids that end a row."""

    def __init__(self, model: PrefixModel, eos: Sequence[int], pad: int) -> None:
        self.model, self.eos, self.pad = model, tuple(eos), pad
        self._keep = "logits_to_keep" in inspect.signature(unwrap(model).forward).parameters

    @torch.no_grad()
    def prefill(self, inputs: Sequence[dict[str, torch.Tensor]], route: Route) -> tuple[torch.Tensor, CacheRows, list[int]]:
        batch = padded_batch(inputs, self.pad, left=True)
        mask = batch["attention_mask"]
        positions = (mask.cumsum(-1) - 1).clamp(min=0)  # as generate numbers a left-padded prompt
        extra = {"logits_to_keep": 1} if self._keep else {}  # as generate asks for the prompt's last logits only
        out = self.model(**batch, position_ids=positions, use_cache=True, prefix=_route(route), **extra)
        layers, _ = from_cache(out.cache)
        return out.logits[:, -1], CacheRows(layers, mask.bool()), mask.sum(-1).tolist()

    @torch.no_grad()
    def step(self, tokens: torch.Tensor, positions: torch.Tensor, rows: CacheRows, route: Route) -> tuple[torch.Tensor, CacheRows]:
        mask = torch.cat([rows.mask, rows.mask.new_ones(rows.rows, 1)], dim=1).long()
        out = self.model(input_ids=tokens[:, None], attention_mask=mask, position_ids=positions[:, None],
                         cache=to_cache(rows), use_cache=True, prefix=_route(route))
        return out.logits[:, -1], rows.appended(from_cache(out.cache)[0])


class BlipStepper:
    """Steps BLIP's text decoder for captions (cross-attention over the image) or VQA (over the question
    encoder's states, which read the image), as ``BlipFor*.generate`` runs it, with each row's cross-attention
    states padded to the batch's longest and masked: BLIP's own decoder never masks them (its attention drops
    the mask it is given), so questions of different lengths could not share a batch there."""

    def __init__(self, model: PrefixModel) -> None:
        self.model, self.base = model, unwrap(model)
        text = self.base.config.text_config
        self.start, self.eos, self.pad = text.bos_token_id, eos_ids(model, None), pad_id(model, None)
        self.decoder = self.base.text_decoder

    @torch.no_grad()
    def prefill(self, inputs: Sequence[dict[str, torch.Tensor]], route: Route) -> tuple[torch.Tensor, CacheRows, list[int]]:
        batch = padded_batch(inputs, self.pad, left=False)  # BLIP's processor pads questions on the right
        asked = None
        with self.model.using(_route(route)):
            states = self.base.vision_model(pixel_values=batch["pixel_values"])[0]
            if "input_ids" in batch:  # VQA: the decoder reads the question encoder's states
                seen = torch.ones(states.shape[:-1], dtype=torch.long, device=states.device)
                asked = batch["attention_mask"].bool()
                states = self.base.text_encoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                                encoder_hidden_states=states, encoder_attention_mask=seen,
                                                return_dict=False)[0]
            cache = EncoderDecoderCache(DynamicCache(), DynamicCache())
            start = torch.full((len(inputs), 1), self.start, device=states.device)
            cross = _additive(asked, states.dtype) if asked is not None and not bool(asked.all()) else None
            logits = self._decode(start, torch.zeros_like(start), None, cross, cache, states)
        rows = start_rows(cache, len(inputs))
        if asked is not None:
            rows.cross_mask = asked
        return logits, rows, [1] * len(inputs)  # the decoder's start token is at position 0

    @torch.no_grad()
    def step(self, tokens: torch.Tensor, positions: torch.Tensor, rows: CacheRows, route: Route) -> tuple[torch.Tensor, CacheRows]:
        cache = to_cache(rows)
        width = self.decoder.config.encoder_hidden_size
        states = rows.mask.new_zeros((rows.rows, 0, width), dtype=rows.layers[0][0].dtype)  # cached: never read
        self_mask = _additive(torch.cat([rows.mask, rows.mask.new_ones(rows.rows, 1)], 1), states.dtype) \
            if rows.padded() else None
        cross_mask = _additive(rows.cross_mask, states.dtype) if rows.cross_padded() else None
        with self.model.using(_route(route)):
            logits = self._decode(tokens[:, None], positions[:, None], self_mask, cross_mask, cache, states)
        return logits, rows.appended(from_cache(cache.self_attention_cache)[0])

    def _decode(self, ids: torch.Tensor, positions: torch.Tensor, self_mask: torch.Tensor | None,
                cross_mask: torch.Tensor | None, cache: EncoderDecoderCache, states: torch.Tensor) -> torch.Tensor:
        """``BlipTextLMHeadModel.forward`` for one new token per row, with the cross-attention mask passed
        where BLIP's layer would drop it; the logits of the new tokens ``[rows, vocabulary]``."""
        bert = self.decoder.bert
        hidden = bert.embeddings(input_ids=ids, position_ids=positions)
        for layer in bert.encoder.layer:
            attended, _ = layer.attention(hidden, attention_mask=self_mask, cache=cache)
            context, _ = layer.crossattention.self(attended, encoder_hidden_states=states,
                                                   encoder_attention_mask=cross_mask, cache=cache)
            attended = layer.crossattention.output(context, attended)
            hidden = apply_chunking_to_forward(layer.feed_forward_chunk, layer.chunk_size_feed_forward,
                                               layer.seq_len_dim, attended)
        return self.decoder.cls(hidden)[:, -1]


def _additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A bool mask ``[rows, keys]`` (True = attend) as BLIP's additive ``[rows, 1, 1, keys]``."""
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)[:, None, None]


def eos_ids(model: Any, tokenizer: Any) -> tuple[int, ...]:
    """The tokens that end a generated row, as the evaluation's decoding sets them: BLIP's [SEP], the
    tokenizer's end of text otherwise."""
    base = unwrap(model)
    return prompt_format(base).eos_ids(base, tokenizer)


def pad_id(model: Any, tokenizer: Any) -> int:
    """The token that pads prompts in a batch, as the processors pad: BLIP's [PAD], the tokenizer's padding
    otherwise (its end of text if it has none: padding is masked anyway)."""
    base = unwrap(model)
    return prompt_format(base).pad_id(base, tokenizer)


def stepper_for(model: PrefixModel, tokenizer: Any) -> tuple[CausalStepper | BlipStepper | None, str]:
    """The stepper for ``model`` and ``""``, or None and why it cannot step."""
    base = unwrap(model)
    form = prompt_format(base)
    config = getattr(base, "generation_config", None)
    changed = sorted(k for k, v in NEUTRAL_GENERATION.items() if getattr(config, k, None) not in (None, v))
    if changed:
        return None, f"its generation config sets {changed}, which only transformers' generate applies"
    if form.stepping == "cross":
        return BlipStepper(model), ""
    if form.stepping is None:
        return None, f"step-level batching covers decoder-only models and BLIP, not the {form.name!r} family"
    text = base.config.get_text_config(decoder=True)
    if getattr(text, "is_encoder_decoder", False) or getattr(base.config, "is_encoder_decoder", False):
        return None, "step-level batching covers decoder-only models and BLIP, not encoder-decoder models"
    layer_types = getattr(text, "layer_types", None) or ()
    if getattr(text, "sliding_window", None) or any(t != "full_attention" for t in layer_types):
        return None, "its sliding-window attention layers keep a cache that rows cannot be merged into"
    return CausalStepper(model, eos_ids(model, tokenizer), pad_id(model, tokenizer)), ""
