"""generate() with prefixes: greedy and beam, cache on and off, left padding, and BLIP/BLIP-2 really using it."""

import pytest
import torch

import tiny
from mmprefix import PrefixConfig, add_prefix

GREEDY = dict(max_new_tokens=6, do_sample=False)
BEAM = dict(max_new_tokens=6, do_sample=False, num_beams=3)


def prefixed(family, std=1.0):
    return add_prefix(tiny.FAMILIES[family][0](), PrefixConfig(num_virtual_tokens=4, init_std=std))


def generate(model, family, settings, **extra):
    inputs, kwargs = tiny.GENERATORS[family]
    with torch.no_grad():
        return model.generate(**inputs(), **kwargs, **settings, **extra, output_scores=True,
                              return_dict_in_generate=True)


def recomputed(pm, family, inputs):
    """(the decoder sequence generate() starts from, a function giving the logits at every position of a
    decoder sequence by recomputing the whole forward: no KV cache, so an independent reference for the
    cached decoding). BLIP-2 and InstructBLIP keep their cache even with use_cache=False (upstream), so
    comparing generate() with and without cache would compare the cache with itself."""
    base = pm.base_model
    ones = lambda seq: torch.ones_like(seq)  # noqa: E731
    if family in ("llama", "gpt2", "opt"):
        return inputs["input_ids"], lambda seq: pm(input_ids=seq, attention_mask=ones(seq)).logits
    if family in ("blip2_opt", "instructblip"):
        return inputs["input_ids"], lambda seq: pm(**{**inputs, "input_ids": seq, "attention_mask": ones(seq)}).logits
    if family in ("t5", "blip2_t5"):
        start = torch.full((inputs["input_ids"].shape[0], 1), base.config.get_text_config().decoder_start_token_id)
        return start, lambda seq: pm(**inputs, decoder_input_ids=seq).logits
    start = torch.full((inputs["pixel_values"].shape[0], 1), base.config.text_config.bos_token_id)
    if family == "blip_caption":
        return start, lambda seq: pm(pixel_values=inputs["pixel_values"], input_ids=seq).logits
    assert family == "blip_vqa"  # its forward returns no logits: the answer decoder on the encoded question

    def answer_logits(seq):
        image = base.vision_model(pixel_values=inputs["pixel_values"])[0]
        question = base.text_encoder(input_ids=inputs["input_ids"], encoder_hidden_states=image)[0]
        return base.text_decoder(input_ids=seq, encoder_hidden_states=question).logits

    return start, answer_logits


@pytest.mark.parametrize("family", sorted(tiny.GENERATORS))
def test_greedy_decoding_equals_a_full_recompute_loop(family):
    """Cached greedy decoding with a prefix against a loop that recomputes the whole forward each step."""
    pm = prefixed(family)
    inputs, settings = tiny.GENERATORS[family][0](), tiny.GENERATORS[family][1]
    config = pm.base_model.generation_config
    pad = settings.get("pad_token_id", config.pad_token_id)
    eos = config.eos_token_id
    with torch.no_grad():
        out = pm.generate(**inputs, **settings, **GREEDY)
        seq, logits_of = recomputed(pm, family, inputs)
        done = torch.zeros(seq.shape[0], dtype=torch.bool)
        for _ in range(GREEDY["max_new_tokens"]):
            chosen = logits_of(seq)[:, -1].argmax(-1).masked_fill(done, pad)
            seq = torch.cat([seq, chosen[:, None]], dim=1)
            done |= chosen == eos
            if done.all():
                break
    assert torch.equal(out, seq)


@pytest.mark.parametrize("family", sorted(tiny.GENERATORS))
def test_beam_search_scores_equal_a_full_recompute(family):
    """Every step's score of every returned beam (cached decoding, beams reordered) equals the log-probability
    of that token under a full forward of the finished sequence."""
    pm = prefixed(family)
    inputs, settings = tiny.GENERATORS[family][0](), tiny.GENERATORS[family][1]
    with torch.no_grad():
        out = pm.generate(**inputs, **settings, **BEAM, num_return_sequences=2, output_scores=True,
                          return_dict_in_generate=True)
        transitions = pm.base_model.compute_transition_scores(out.sequences, out.scores, out.beam_indices,
                                                              normalize_logits=False)
        start, logits_of = recomputed(pm, family, {k: v.repeat_interleave(2, dim=0) for k, v in inputs.items()})
        sequences = out.sequences
        log_probs = logits_of(sequences).log_softmax(-1)
    steps = transitions.shape[1]
    first = start.shape[1]
    expected = log_probs[:, first - 1 : first - 1 + steps].gather(-1, sequences[:, first : first + steps, None])[..., 0]
    live = out.beam_indices[:, :steps] >= 0  # steps after a beam finished are padding
    assert live[:, 0].all()
    torch.testing.assert_close(transitions[live], expected[live], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", sorted(tiny.GENERATORS))
def test_generation_really_uses_the_prefix_and_disabled_is_the_base_model(family):
    """PEFT's prefix is silently ignored by BLIP and BLIP-2 generate(); here the scores must move."""
    base = generate(tiny.FAMILIES[family][0](), family, GREEDY)
    pm = prefixed(family)
    with pm.disable_prefix():
        off = generate(pm, family, GREEDY)
    on = generate(pm, family, GREEDY)
    assert torch.equal(off.sequences, base.sequences)
    for a, b in zip(off.scores, base.scores):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.allclose(on.scores[0], base.scores[0], atol=1e-3)


def _left_pad(rows, pad):
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row):] = torch.tensor(row)
        mask[i, width - len(row):] = 1
    return ids, mask


@pytest.mark.parametrize("family", ["llama", "gpt2", "opt", "blip2_opt"])
@pytest.mark.parametrize("settings", [GREEDY, BEAM], ids=["greedy", "beam"])
def test_left_padded_batch_equals_each_sample_alone(family, settings):
    pm = prefixed(family)
    pad = 1 if family in ("opt", "blip2_opt") else 0
    rows = [[5, 6, 7, 8, 9, 10], [11, 12, 13], [14]]
    extra = {}
    if family == "blip2_opt":
        rows = [[tiny.IMAGE_TOKEN] * 4 + r for r in rows]
        extra = dict(pixel_values=tiny.pixels(3))
    ids, mask = _left_pad(rows, pad)
    with torch.no_grad():
        batch = pm.generate(input_ids=ids, attention_mask=mask, pad_token_id=pad, **settings, **extra)
        for i, row in enumerate(rows):
            single_extra = {k: v[i : i + 1] for k, v in extra.items()}
            alone = pm.generate(input_ids=torch.tensor([row]), attention_mask=torch.ones(1, len(row), dtype=torch.long),
                                pad_token_id=pad, **settings, **single_extra)
            generated = batch[i, ids.shape[1]:]
            assert torch.equal(generated[: alone.shape[1] - len(row)], alone[0, len(row):]), f"row {i}"


def test_routed_generation_widens_each_kind_of_mask_once_per_step_on_models_with_many_sites(monkeypatch):
    """A decoder with self- and cross-attention in 40 layers (120 sites): routed generation builds the self and the
    cross mask once per step. The mask cache's size limit counted every entry of the call's cache (a routed prefix
    per site), so past 64 sites each miss emptied it and the two kinds of mask were rebuilt at every layer."""
    from transformers import BartConfig, BartForConditionalGeneration

    from mmprefix.core.attention import mechanism

    config = BartConfig(vocab_size=64, d_model=16, encoder_layers=40, decoder_layers=40, encoder_attention_heads=2,
                        decoder_attention_heads=2, encoder_ffn_dim=16, decoder_ffn_dim=16, max_position_embeddings=32,
                        forced_eos_token_id=None, forced_bos_token_id=None)
    model = add_prefix(BartForConditionalGeneration(config).eval(), PrefixConfig(num_virtual_tokens=2), name="a")
    model.add_prefix("b", PrefixConfig(num_virtual_tokens=3))
    assert len(model.sites) == 120
    widened = []
    original = mechanism._widen
    monkeypatch.setattr(mechanism, "_widen", lambda *args: widened.append(1) or original(*args))
    ids = torch.randint(4, 64, (2, 5))
    with torch.no_grad():
        model.generate(input_ids=ids, prefix=["a", "b"], max_new_tokens=4, min_new_tokens=4, do_sample=False)
    steps = 4
    # the encoder's mask once, the cross mask once (the same tensor at every step), a self mask per step; counting
    # every cache entry against the limit rebuilt both decoder masks after each eviction (12 here)
    assert len(widened) <= 2 + steps, len(widened)
