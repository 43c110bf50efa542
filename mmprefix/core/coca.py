"""Caption decoding for open_clip CoCa models, with prefixes.

open_clip's ``CoCa.generate`` needs transformers <= 4.56 (``BeamSearchScorer``), so mmprefix decodes itself.
CoCa's decoder has no KV cache: every step re-runs the text tower and the multimodal decoder on the whole
sequence, with the image encoded once. Beams of a sample are consecutive rows, as in transformers, so a
per-sample routing list follows them.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import nn

from .architectures import is_open_clip, unwrap
from .model import PrefixModel


@torch.no_grad()
def coca_generate(
    model: nn.Module,
    images: torch.Tensor,
    *,
    sot_token_id: int,
    eot_token_id: int,
    max_new_tokens: int = 20,
    num_beams: int = 1,
    pad_token_id: int | None = None,
    prefix: Any = None,
) -> torch.Tensor:
    """Captions ``[B, 1 + generated]`` starting with ``sot_token_id``; finished rows are padded.

    ``model`` is an open_clip ``CoCa`` or a `PrefixModel` around one; ``prefix`` routes it like
    ``PrefixModel.forward`` (default: the active prefix). Greedy when ``num_beams == 1``, otherwise beam
    search ranking beams by the sum of their token log-probabilities.
    """
    coca = unwrap(model)
    if not (is_open_clip(coca) and hasattr(coca, "text_decoder")):
        raise ValueError(f"coca_generate needs an open_clip CoCa model, got {type(coca).__name__}")
    if prefix is not None and not isinstance(model, PrefixModel):
        raise ValueError("prefix= needs a PrefixModel (the result of add_prefix)")
    pad = coca.pad_id if pad_token_id is None else pad_token_id
    steps = min(max_new_tokens, coca.context_length - 1)

    def routed(repeats: int) -> contextlib.AbstractContextManager:
        """``prefix`` for rows repeated ``repeats`` times (beams of a sample are consecutive rows)."""
        if prefix is None:
            return contextlib.nullcontext()
        if isinstance(prefix, str) or repeats == 1:
            return model.using(prefix)
        return model.using([name for name in prefix for _ in range(repeats)])

    with routed(1):
        latent, embeddings = coca._encode_image(images)
    batch = images.shape[0]
    if num_beams > 1:
        latent, embeddings = latent.repeat_interleave(num_beams, 0), embeddings.repeat_interleave(num_beams, 0)

    def next_logits(tokens: torch.Tensor) -> torch.Tensor:
        out = coca(images, tokens, image_latent=latent, image_embs=embeddings, output_labels=False)
        return out["logits"][:, -1].float()

    with routed(num_beams):
        if num_beams == 1:
            return _greedy(next_logits, batch, steps, sot_token_id, eot_token_id, pad, images.device)
        return _beam_search(next_logits, batch, num_beams, steps, sot_token_id, eot_token_id, pad, images.device)


def _greedy(next_logits, batch, steps, sot, eot, pad, device) -> torch.Tensor:
    tokens = torch.full((batch, 1), sot, device=device)
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    for _ in range(steps):
        chosen = next_logits(tokens).argmax(-1).masked_fill(done, pad)
        tokens = torch.cat([tokens, chosen[:, None]], dim=1)
        done |= chosen == eot
        if done.all():
            break
    return tokens


def _beam_search(next_logits, batch, beams, steps, sot, eot, pad, device) -> torch.Tensor:
    tokens = torch.full((batch * beams, 1), sot, device=device)
    scores = torch.zeros(batch, beams, device=device)
    scores[:, 1:] = float("-inf")  # all beams start equal: expand from the first only
    done = torch.zeros(batch * beams, dtype=torch.bool, device=device)
    rows = torch.arange(batch, device=device)[:, None]
    for _ in range(steps):
        log_probs = next_logits(tokens).log_softmax(-1)
        vocab = log_probs.shape[-1]
        # A finished beam continues only with padding, at no cost.
        log_probs[done] = float("-inf")
        log_probs[done, pad] = 0.0
        candidates = (scores.view(-1, 1) + log_probs).view(batch, beams * vocab)
        scores, index = candidates.topk(beams, dim=-1)
        origin, chosen = index // vocab, index % vocab
        tokens = torch.cat([tokens.view(batch, beams, -1)[rows, origin].flatten(0, 1), chosen.view(-1, 1)], dim=1)
        done = done.view(batch, beams)[rows, origin].flatten() | (chosen.view(-1) == eot)
        if done.all():
            break
    best = scores.argmax(-1)
    return tokens.view(batch, beams, -1)[torch.arange(batch, device=device), best]
