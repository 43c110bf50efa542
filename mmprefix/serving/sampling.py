"""Choosing each row's next token, and turning a row's tokens into the text a client reads.

`Sampling`: greedy (temperature 0) or sampling at a temperature with nucleus (``top_p``) filtering, from the
row's own `torch.Generator` seeded with the request's ``seed``: a row's draws depend on its seed alone, never on
the rows that share its batch. `next_tokens` picks the next token of every row of a batch.

`Finisher`: a row's text as its tokens arrive: where it ends (end of text, a ``stop`` sequence, the token
limit), and which part of it can already be streamed (text that a later token could still turn into a stop
sequence is held back).
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

MAX_STOP_SEQUENCES = 4  # as OpenAI's API


@dataclass
class Sampling:
    """How a row picks its tokens: ``temperature`` 0 is greedy (the highest logit); above 0 a token is drawn from
    the softmax of ``logits / temperature``, restricted to the smallest set of tokens whose probability reaches
    ``top_p``. ``seed``: the row's generator starts there (None: a random seed)."""

    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    generator: torch.Generator | None = field(default=None, repr=False)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def start(self, device: torch.device) -> None:
        """Make the row's generator (sampling rows only), on the device its logits will be on."""
        if not self.greedy and self.generator is None:
            seed = self.seed if self.seed is not None else secrets.randbits(63)
            self.generator = torch.Generator(device=device).manual_seed(seed)


def check_sampling(temperature: float | None, top_p: float | None) -> tuple[float, float]:
    """``(temperature, top_p)`` as a row uses them, or ValueError. Without a temperature decoding is greedy,
    unless ``top_p`` asks for sampling (then at temperature 1, OpenAI's default)."""
    if temperature is not None and not 0 <= temperature <= 2:
        raise ValueError(f"temperature must be from 0 to 2, got {temperature!r}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be above 0 and at most 1, got {top_p!r}")
    if temperature is None:
        temperature = 1.0 if top_p is not None and top_p < 1 else 0.0
    return float(temperature), float(1.0 if top_p is None else top_p)


def next_tokens(logits: torch.Tensor, samplings: Sequence[Sampling]) -> list[int]:
    """The next token of each row of ``logits`` ``[rows, vocabulary]``; greedy rows all at once, each sampling
    row from its own generator."""
    chosen = logits.argmax(-1).tolist()
    for row, sampling in enumerate(samplings):
        if not sampling.greedy:
            chosen[row] = _draw(logits[row], sampling)
    return chosen


def _draw(logits: torch.Tensor, sampling: Sampling) -> int:
    probabilities = (logits.float() / sampling.temperature).softmax(-1)
    if sampling.top_p < 1:
        ordered, order = probabilities.sort(descending=True)
        before = ordered.cumsum(0) - ordered  # the mass of the tokens ranked above each one
        ordered = ordered.masked_fill(before >= sampling.top_p, 0.0)  # the first token is always kept
        probabilities = torch.zeros_like(probabilities).scatter(0, order, ordered)
    return int(torch.multinomial(probabilities, 1, generator=sampling.generator))


def check_stop(stop: str | Sequence[str] | None) -> tuple[str, ...]:
    """The stop sequences of a request (one string or up to four), or ValueError."""
    if stop is None:
        return ()
    sequences = (stop,) if isinstance(stop, str) else tuple(stop)
    if len(sequences) > MAX_STOP_SEQUENCES:
        raise ValueError(f"stop holds {len(sequences)} sequences; send at most {MAX_STOP_SEQUENCES}")
    if not all(isinstance(s, str) and s for s in sequences):
        raise ValueError("stop sequences must be non-empty strings")
    return sequences


class Finisher:
    """One row's generated text: ``push`` each token; ``finish_reason`` says when and why it ended (``"stop"``:
    end of text or a stop sequence, ``"length"``: the token limit); ``text`` is the answer (without the stop
    sequence), ``piece()`` the part not yet handed out that can no longer change.

    ``decode``: token ids to text (the evaluation's decoding: special tokens dropped, spaces normalised).
    ``streamed``: the text is wanted as it grows (else, without stop sequences, it is decoded once, at the end)."""

    def __init__(self, decode: Callable[[list[int]], str], eos: Sequence[int], stop: Sequence[str], limit: int,
                 streamed: bool = True) -> None:
        self.decode, self.eos, self.stop, self.limit = decode, set(eos), tuple(stop), limit
        self.watch = streamed or bool(self.stop)
        self.tokens: list[int] = []
        self.text = ""
        self.sent = ""
        self.finish_reason: str | None = None

    def push(self, token: int) -> None:
        """Add the next generated token (ignored once the row has finished)."""
        if self.finish_reason is not None:
            return
        self.tokens.append(token)
        if token in self.eos:
            self.finish_reason = "stop"
        elif self.watch:
            self.text = self.decode(self.tokens)
            cut = min((i for i in (self.text.find(s) for s in self.stop) if i >= 0), default=-1)
            if cut >= 0:
                self.text, self.finish_reason = self.text[:cut], "stop"
        if self.finish_reason is None and len(self.tokens) >= self.limit:
            self.finish_reason = "length"
        if self.finish_reason is not None and not self.watch:
            self.text = self.decode(self.tokens)

    def piece(self) -> str:
        """Text that can be streamed now: once the row has finished, the rest of its answer; before, the new
        text minus an ending that could still be the start of a stop sequence (or an incomplete character)."""
        text = self.text
        if self.finish_reason is None:
            text = text.rstrip("\ufffd")
            held = max((n for s in self.stop for n in range(1, len(s)) if text.endswith(s[:n])), default=0)
            text = text[: len(text) - held]
        if len(text) <= len(self.sent) or not text.startswith(self.sent):
            return ""  # nothing new, or a decoding that changed what was sent: wait for it to settle
        piece, self.sent = text[len(self.sent) :], text
        return piece
