"""Every attention route against a hand-computed softmax(q [Kp;K]^T * scale + [0;mask]) [Vp;V].

Each test calls one attention module of a tiny model directly, with the prefix active, and recomputes its
output from the module's own projection weights in plain torch."""

import pytest
import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

import tiny
from mmprefix import PrefixConfig, add_prefix

P = 3
NEG = torch.finfo(torch.float32).min


def reference(q, k, v, pk, pv, allowed=None, scale=None, bias=None):
    """q [B,H,T,d]; k, v [B,Hkv,S,d]; pk, pv [Hkv,P,d]; allowed [B,1,T,S] bool over the real keys."""
    batch, heads, length, dim = q.shape
    keys = torch.cat([pk.expand(batch, -1, -1, -1), k], dim=2).repeat_interleave(heads // k.shape[1], dim=1)
    values = torch.cat([pv.expand(batch, -1, -1, -1), v], dim=2).repeat_interleave(heads // k.shape[1], dim=1)
    scores = q @ keys.transpose(-1, -2) * (dim**-0.5 if scale is None else scale)
    if bias is not None:  # relative position bias over the real keys; prefix slots get none
        scores = scores + torch.nn.functional.pad(bias, (pk.shape[1], 0))
    if allowed is not None:
        full = torch.cat([torch.ones(*allowed.shape[:-1], pk.shape[1], dtype=torch.bool), allowed], dim=-1)
        scores = scores.masked_fill(~full, float("-inf"))
    out = scores.softmax(-1) @ values
    return out.transpose(1, 2).reshape(batch, length, heads * dim)


def heads(x, dim):
    return x.view(*x.shape[:2], -1, dim).transpose(1, 2)


def prefixed(model, module_name, std=1.0):
    pm = add_prefix(model, PrefixConfig(num_virtual_tokens=P, init_std=std))
    prefix = pm.prefixes["default"].prefix(module_name)
    return pm, pm.base_model.get_submodule(module_name), prefix.keys[0].detach(), prefix.values[0].detach()


def as_mask(allowed, implementation):
    """A boolean 'may attend' mask in the format the implementation expects."""
    if implementation == "sdpa":
        return allowed
    return torch.zeros(allowed.shape).masked_fill(~allowed, NEG)


def causal_padded(batch, length, pad_first_row=2):
    allowed = torch.ones(length, length, dtype=torch.bool).tril()[None, None].repeat(batch, 1, 1, 1)
    allowed[0, :, :, :pad_first_row] = False  # left padding in row 0
    allowed[0, :, :pad_first_row, :pad_first_row] = torch.eye(pad_first_row, dtype=torch.bool)  # pads see themselves
    return allowed


def hidden(batch=2, length=5, width=32, seed=0):
    return torch.randn(batch, length, width, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
def test_clip_vision_self_attention(implementation):
    name = "vision_model.encoder.layers.1.self_attn"
    _, m, pk, pv = prefixed(tiny.clip(attn=implementation), name)
    h = hidden()
    with torch.no_grad():
        out = m(h)[0]
        ref = m.out_proj(reference(heads(m.q_proj(h), 8), heads(m.k_proj(h), 8), heads(m.v_proj(h), 8), pk, pv))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_clip_text_causal_without_mask_is_bottom_right_over_prefix():
    """SDPA path with mask None and is_causal=True (what CLIP text passes when nothing is padded)."""
    name = "text_model.encoder.layers.0.self_attn"
    _, m, pk, pv = prefixed(tiny.clip(attn="sdpa"), name)
    h = hidden(length=6)
    allowed = torch.ones(6, 6, dtype=torch.bool).tril()[None, None].expand(2, 1, 6, 6)
    with torch.no_grad():
        out = m(h, attention_mask=None, is_causal=True)[0]
        ref = m.out_proj(reference(heads(m.q_proj(h), 8), heads(m.k_proj(h), 8), heads(m.v_proj(h), 8), pk, pv, allowed))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
def test_clip_text_causal_and_padding_mask(implementation):
    name = "text_model.encoder.layers.1.self_attn"
    _, m, pk, pv = prefixed(tiny.clip(attn=implementation), name)
    h = hidden(length=6)
    allowed = causal_padded(2, 6)
    with torch.no_grad():
        out = m(h, attention_mask=as_mask(allowed, implementation), is_causal=True)[0]
        ref = m.out_proj(reference(heads(m.q_proj(h), 8), heads(m.k_proj(h), 8), heads(m.v_proj(h), 8), pk, pv, allowed))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_blip_vision_fused_qkv():
    name = "vision_model.encoder.layers.0.self_attn"
    _, m, pk, pv = prefixed(tiny.blip(), name)
    h = hidden()
    with torch.no_grad():
        out = m(h)[0]
        q, k, v = m.qkv(h).chunk(3, dim=-1)
        ref = m.projection(reference(heads(q, 8), heads(k, 8), heads(v, 8), pk, pv))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_blip_text_decoder_self_attention_with_causal_padding_mask():
    name = "text_decoder.bert.encoder.layer.1.attention.self"
    _, m, pk, pv = prefixed(tiny.blip(), name)
    h = hidden(length=6)
    allowed = causal_padded(2, 6)
    with torch.no_grad():
        out = m(h, attention_mask=as_mask(allowed, "eager"))[0]
        ref = reference(heads(m.query(h), 8), heads(m.key(h), 8), heads(m.value(h), 8), pk, pv, allowed)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_blip_text_cross_attention():
    name = "text_decoder.bert.encoder.layer.0.crossattention.self"
    _, m, pk, pv = prefixed(tiny.blip(), name)
    h, image = hidden(length=4), hidden(length=17, seed=1)
    with torch.no_grad():
        out = m(h, encoder_hidden_states=image)[0]
        ref = reference(heads(m.query(h), 8), heads(m.key(image), 8), heads(m.value(image), 8), pk, pv)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["attention", "crossattention"])
def test_blip2_qformer_self_and_cross(kind):
    name = f"qformer.encoder.layer.0.{kind}.attention"
    _, m, pk, pv = prefixed(tiny.blip2("opt"), name)
    h, image = hidden(length=4), hidden(length=17, seed=1)
    with torch.no_grad():
        if kind == "attention":
            allowed = torch.ones(2, 1, 4, 4, dtype=torch.bool)
            allowed[1, ..., -1] = False  # a padded query token in row 1
            out = m(h, attention_mask=as_mask(allowed, "eager"))[0]
            ref = reference(heads(m.query(h), 8), heads(m.key(h), 8), heads(m.value(h), 8), pk, pv, allowed)
        else:
            out = m(h, encoder_hidden_states=image)[0]
            ref = reference(heads(m.query(h), 8), heads(m.key(image), 8), heads(m.value(image), 8), pk, pv)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
def test_opt_prescaled_causal(implementation):
    name = "model.decoder.layers.0.self_attn"
    _, m, pk, pv = prefixed(tiny.opt(attn=implementation), name)
    h = hidden(length=6)
    allowed = causal_padded(2, 6)
    with torch.no_grad():
        out = m(h, attention_mask=as_mask(allowed, implementation))[0]
        q = heads(m.q_proj(h) * 8**-0.5, 8)
        ref = m.out_proj(reference(q, heads(m.k_proj(h), 8), heads(m.v_proj(h), 8), pk, pv, allowed, scale=1.0))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
def test_llama_gqa_rope_prefix_not_rotated(implementation):
    model = tiny.llama(attn=implementation)
    name = "model.layers.1.self_attn"
    _, m, pk, pv = prefixed(model, name)
    assert pk.shape == (2, P, 8)  # key/value heads, not query heads
    h = hidden(length=6)
    positions = torch.arange(6)[None].expand(2, -1)
    cos, sin = model.model.rotary_emb(h, positions)
    allowed = causal_padded(2, 6)
    with torch.no_grad():
        out = m(h, position_embeddings=(cos, sin), attention_mask=as_mask(allowed, implementation))[0]
        q, k = apply_rotary_pos_emb(heads(m.q_proj(h), 8), heads(m.k_proj(h), 8), cos, sin)
        ref = m.o_proj(reference(q, k, heads(m.v_proj(h), 8), pk, pv, allowed))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_llama_sdpa_without_mask_is_causal():
    model = tiny.llama(attn="sdpa")
    name = "model.layers.0.self_attn"
    _, m, pk, pv = prefixed(model, name)
    h = hidden(length=6)
    cos, sin = model.model.rotary_emb(h, torch.arange(6)[None])
    with torch.no_grad():
        out = m(h, position_embeddings=(cos, sin), attention_mask=None)[0]
        q, k = apply_rotary_pos_emb(heads(m.q_proj(h), 8), heads(m.k_proj(h), 8), cos, sin)
        allowed = torch.ones(6, 6, dtype=torch.bool).tril()[None, None]
        ref = m.o_proj(reference(q, k, heads(m.v_proj(h), 8), pk, pv, allowed))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
def test_gpt2_fused_qkv_causal(implementation):
    name = "transformer.h.1.attn"
    _, m, pk, pv = prefixed(tiny.gpt2(attn=implementation), name)
    h = hidden(length=6)
    allowed = causal_padded(2, 6)
    with torch.no_grad():
        out = m(h, attention_mask=as_mask(allowed, implementation))[0]
        q, k, v = m.c_attn(h).split(32, dim=2)
        ref = m.c_proj(reference(heads(q, 8), heads(k, 8), heads(v, 8), pk, pv, allowed))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
def test_t5_relative_position_bias_encoder_self(implementation):
    name = "encoder.block.0.layer.0.SelfAttention"
    _, m, pk, pv = prefixed(tiny.t5(attn=implementation), name)
    h = hidden(length=6)
    allowed = torch.ones(2, 1, 1, 6, dtype=torch.bool)
    allowed[0, ..., :2] = False  # padding in row 0
    with torch.no_grad():
        out, bias, _ = m(h, mask=as_mask(allowed, implementation))
        assert bias.shape[-1] == 6  # the bias T5 passes on to later layers covers the real keys only
        ref_bias = m.compute_bias(6, 6)
        ref = m.o(reference(heads(m.q(h), 8), heads(m.k(h), 8), heads(m.v(h), 8), pk, pv,
                            allowed.expand(2, 1, 6, 6), scale=1.0, bias=ref_bias))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_t5_decoder_cross_attention():
    name = "decoder.block.1.layer.1.EncDecAttention"
    _, m, pk, pv = prefixed(tiny.t5(), name)
    h, encoded = hidden(length=4), hidden(length=7, seed=1)
    with torch.no_grad():
        out = m(h, key_value_states=encoded)[0]
        ref = m.o(reference(heads(m.q(h), 8), heads(m.k(encoded), 8), heads(m.v(encoded), 8), pk, pv, scale=1.0))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_blip2_t5_decoder_self_attention_is_reached():
    """The T5 inside BLIP-2 goes through the same route as a standalone T5."""
    pm = add_prefix(tiny.blip2("t5"), PrefixConfig(num_virtual_tokens=P, targets=["lm_decoder.self"]))
    assert {s.name for s in pm.sites} == {f"language_model.decoder.block.{i}.layer.0.SelfAttention" for i in (0, 1)}


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
def test_llama_through_its_own_forward_with_left_padding(implementation):
    """The masks a real call builds (left padding, causal, the model's own mask format) reach the prefixed
    attention intact: layer 0's output inside a full model call against the reference on its captured input."""
    pm, module, pk, pv = prefixed(tiny.llama(attn=implementation), "model.layers.0.self_attn")
    seen = {}
    module.register_forward_pre_hook(lambda m, args, kwargs: seen.update(kwargs), with_kwargs=True)
    module.register_forward_hook(lambda m, args, output: seen.update(output=output[0]))
    ids = tiny.tokens(length=6)
    mask = torch.ones_like(ids)
    mask[0, :2] = 0  # row 0 is left-padded
    with torch.no_grad():
        pm(input_ids=ids, attention_mask=mask)
        states, (cos, sin) = seen["hidden_states"], seen["position_embeddings"]
        q, k = apply_rotary_pos_emb(heads(module.q_proj(states), 8), heads(module.k_proj(states), 8), cos, sin)
        allowed = torch.ones(6, 6, dtype=torch.bool).tril()[None, None] & mask.bool()[:, None, None, :]
        expected = module.o_proj(reference(q, k, heads(module.v_proj(states), 8), pk, pv, allowed))
    real = mask.bool()  # padded query rows attend to nothing real; the model leaves them undefined
    torch.testing.assert_close(seen["output"][real], expected[real], rtol=1e-5, atol=1e-5)


def test_git_text_attention_in_the_models_own_forward_against_a_hand_computed_reference():
    """GIT's hand-written text attention (image tokens and text in one sequence, GIT's own mask), reached through
    a real call: the module's output equals softmax over [prefix; keys] with the mask GIT built."""
    import tiny_families

    name = "git.encoder.layer.0.attention.self"
    pm, module, pk, pv = prefixed(tiny_families.git().eval(), name)
    seen = {}
    module.register_forward_pre_hook(lambda m, args: seen.update(hidden=args[0], mask=args[1]))
    module.register_forward_hook(lambda m, args, out: seen.update(out=out[0]))
    batch = tiny_families.git_processor()(images=tiny_families.images(1), text=["what color is the shape"],
                                          return_tensors="pt")
    with torch.no_grad():
        pm(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"])
        q, k, v = (heads(projection(seen["hidden"]), 8) for projection in (module.query, module.key, module.value))
        expected = reference(q, k, v, pk, pv, allowed=seen["mask"] == 0)
    assert seen["mask"].shape[-1] == q.shape[2] and not bool((seen["mask"] == 0).all()), "GIT's mask is causal on text"
    torch.testing.assert_close(seen["out"], expected, rtol=1e-5, atol=1e-5)
