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


@pytest.mark.parametrize("family", sorted(tiny.GENERATORS))
@pytest.mark.parametrize("settings", [GREEDY, BEAM], ids=["greedy", "beam"])
def test_cache_on_and_off_give_the_same_tokens(family, settings):
    pm = prefixed(family)
    cached = generate(pm, family, settings, use_cache=True)
    recomputed = generate(pm, family, settings, use_cache=False)
    assert torch.equal(cached.sequences, recomputed.sequences)
    for a, b in zip(cached.scores, recomputed.scores):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


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


@pytest.mark.parametrize("family", ["llama", "gpt2", "opt"])
def test_greedy_equals_a_naive_full_recompute_loop(family):
    pm = prefixed(family)
    ids = tiny.tokens(1)
    with torch.no_grad():
        out = pm.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **GREEDY, **tiny.GENERATORS[family][1])
        seq = ids
        for _ in range(GREEDY["max_new_tokens"]):
            next_token = pm(input_ids=seq).logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, next_token], dim=1)
    assert torch.equal(out, seq)


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
