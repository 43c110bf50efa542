"""open_clip backend: CLIP (default and custom attention blocks) and CoCa, on tiny configs registered offline."""

import pytest
import torch
from torch.nn import functional as F

import tiny
from mmprefix import PrefixConfig, add_prefix, load_prefix
from mmprefix.core.coca import coca_generate
from test_attention import reference

MODELS = ["mmprefix-tiny-clip", "mmprefix-tiny-clip-custom", "mmprefix-tiny-coca"]


def frozen(name):
    model = tiny.open_clip_model(name)
    for parameter in model.parameters():  # frozen like a wrapped model: torch picks kernels by requires_grad
        parameter.requires_grad_(False)
    return model


def outputs(model):
    image, text = tiny.pixels(), tiny.open_clip_text()
    out = model(image, text)
    if isinstance(out, dict):
        return torch.cat([out["image_features"], out["text_features"], out["logits"].flatten(1)], dim=-1)
    return torch.cat([out[0], out[1]], dim=-1)


def test_sites_of_each_open_clip_model():
    expected = {
        "mmprefix-tiny-clip": {("vision", "self", "torch_mha"): 2, ("text", "self", "torch_mha"): 2},
        "mmprefix-tiny-clip-custom": {("vision", "self", "open_clip"): 2, ("text", "self", "open_clip"): 2},
        "mmprefix-tiny-coca": {("vision", "self", "torch_mha"): 2, ("vision", "cross", "torch_mha"): 1,
                               ("text", "self", "torch_mha"): 2, ("text_decoder", "self", "torch_mha"): 2,
                               ("text_decoder", "cross", "torch_mha"): 2},
    }
    for name, counts in expected.items():
        pm = add_prefix(tiny.open_clip_model(name), PrefixConfig(num_virtual_tokens=2))
        got = {}
        for s in pm.sites:
            got[(s.tower, s.kind, s.route)] = got.get((s.tower, s.kind, s.route), 0) + 1
        assert got == counts, name
    coca = add_prefix(tiny.open_clip_model("mmprefix-tiny-coca"), PrefixConfig(num_virtual_tokens=2))
    assert "visual.attn_pool.attn" in {s.name for s in coca.sites}


@pytest.mark.parametrize("name", MODELS)
def test_prefix_off_and_zero_length_equal_the_original(name):
    with torch.no_grad():
        expected = outputs(frozen(name))
        pm = add_prefix(tiny.open_clip_model(name), PrefixConfig(num_virtual_tokens=3, init_std=1.0))
        with pm.disable_prefix():
            torch.testing.assert_close(outputs(pm), expected, rtol=0, atol=0)
        assert not torch.allclose(outputs(pm), expected, atol=1e-4)
        empty = add_prefix(tiny.open_clip_model(name), PrefixConfig(num_virtual_tokens=0))
        torch.testing.assert_close(outputs(empty), expected, rtol=0, atol=0)
        closed = add_prefix(tiny.open_clip_model(name), PrefixConfig(num_virtual_tokens=3, init_std=1.0, gate="head"))
        torch.testing.assert_close(outputs(closed), expected, rtol=0, atol=0)
        # removal gives back trainable weights, which torch computes with other kernels than frozen ones
        torch.testing.assert_close(outputs(pm.remove_prefix()), outputs(tiny.open_clip_model(name)), rtol=0, atol=0)


def _mha_heads(module, x, part):
    weight, bias = module.in_proj_weight.chunk(3)[part], module.in_proj_bias.chunk(3)[part]
    return F.linear(x, weight, bias).view(*x.shape[:2], -1, 8).transpose(1, 2)


def test_text_self_attention_with_the_causal_mask_against_a_hand_computed_reference():
    model = tiny.open_clip_model()
    pm = add_prefix(model, PrefixConfig(num_virtual_tokens=3, init_std=1.0))
    module = model.transformer.resblocks[1].attn
    pk, pv = (t.detach() for t in pm.prefixes["default"].kv("transformer.resblocks.1.attn"))
    x = torch.randn(2, 12, 32, generator=torch.Generator().manual_seed(0))
    causal = model.attn_mask  # float, -inf above the diagonal
    with torch.no_grad():
        out = module(x, x, x, need_weights=False, attn_mask=causal)[0]
        q, k, v = (_mha_heads(module, x, i) for i in range(3))
        ref = module.out_proj(reference(q, k, v, pk, pv, (causal == 0)[None, None].expand(2, 1, 12, 12)))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_key_padding_mask_is_respected():
    model = tiny.open_clip_model()
    pm = add_prefix(model, PrefixConfig(num_virtual_tokens=3, init_std=1.0))
    module = model.visual.transformer.resblocks[0].attn
    pk, pv = (t.detach() for t in pm.prefixes["default"].kv("visual.transformer.resblocks.0.attn"))
    x = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(0))
    padding = torch.tensor([[False] * 5, [False, False, False, True, True]])
    with torch.no_grad():
        out = module(x, x, x, key_padding_mask=padding, need_weights=False)[0]
        q, k, v = (_mha_heads(module, x, i) for i in range(3))
        allowed = (~padding)[:, None, None, :].expand(2, 1, 5, 5)
        ref = module.out_proj(reference(q, k, v, pk, pv, allowed))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_coca_cross_attention_against_a_hand_computed_reference():
    model = tiny.open_clip_model("mmprefix-tiny-coca")
    pm = add_prefix(model, PrefixConfig(num_virtual_tokens=3, init_std=1.0))
    name = "text_decoder.cross_attn.1.attn"
    module = model.get_submodule(name)
    pk, pv = (t.detach() for t in pm.prefixes["default"].kv(name))
    text = torch.randn(2, 6, 32, generator=torch.Generator().manual_seed(0))
    image = torch.randn(2, 17, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = module(text, image, image, need_weights=False)[0]
        q, k, v = _mha_heads(module, text, 0), _mha_heads(module, image, 1), _mha_heads(module, image, 2)
        ref = module.out_proj(reference(q, k, v, pk, pv))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_open_clip_custom_attention_with_qk_norm_and_head_scale():
    model = tiny.open_clip_model("mmprefix-tiny-clip-custom")
    pm = add_prefix(model, PrefixConfig(num_virtual_tokens=3, init_std=1.0))
    name = "text.transformer.resblocks.0.attn"
    module = model.get_submodule(name)
    with torch.no_grad():
        module.head_scale.uniform_(0.5, 1.5)
    pk, pv = (t.detach() for t in pm.prefixes["default"].kv(name))
    x = torch.randn(2, 12, 32, generator=torch.Generator().manual_seed(0))
    causal = torch.full((12, 12), float("-inf")).triu(1)
    with torch.no_grad():
        out = module(x, attn_mask=causal)
        q, k, v = (t.view(2, 12, 4, 8).transpose(1, 2) for t in F.linear(x, module.in_proj_weight, module.in_proj_bias).chunk(3, -1))
        context = reference(module.ln_q(q), module.ln_k(k), v, pk, pv, (causal == 0)[None, None].expand(2, 1, 12, 12))
        context = (context.view(2, 12, 4, 8) * module.head_scale.view(1, 1, 4, 1)).reshape(2, 12, 32)
        ref = module.out_proj(module.ln_inner(context))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", MODELS)
def test_gradients_reach_only_the_prefixes(name):
    pm = add_prefix(tiny.open_clip_model(name), PrefixConfig(num_virtual_tokens=3, init_std=0.5))
    outputs(pm).pow(2).mean().backward()
    for parameter_name, parameter in pm.prefixes.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, parameter_name
    assert all(p.grad is None for p in pm.base_model.parameters())


@pytest.mark.parametrize("name", ["mmprefix-tiny-clip", "mmprefix-tiny-clip-custom"])
def test_text_stays_causal_with_a_prefix(name):
    model = tiny.open_clip_model(name)
    pm = add_prefix(model, PrefixConfig(num_virtual_tokens=3, init_std=1.0))
    transformer = model.transformer if hasattr(model, "transformer") else model.text.transformer
    captured = []
    transformer.register_forward_hook(lambda module, args, out: captured.append(out))
    text = tiny.open_clip_text()
    changed = text.clone()
    changed[:, 5] = 42
    with torch.no_grad():
        pm.encode_text(text)
        pm.encode_text(changed)
    before, after = captured
    torch.testing.assert_close(before[:, :5], after[:, :5], rtol=0, atol=1e-6)
    assert not torch.allclose(before[:, 5:], after[:, 5:])


@pytest.mark.parametrize("name", MODELS)
def test_bfloat16_base_with_float32_prefix_under_autocast(name):
    pm = add_prefix(tiny.open_clip_model(name).to(torch.bfloat16), PrefixConfig(num_virtual_tokens=3, init_std=0.5))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = pm(tiny.pixels().bfloat16(), tiny.open_clip_text())
    features = out["image_features"] if isinstance(out, dict) else out[0]
    (features.float().pow(2).mean() * 1024).backward()
    assert torch.isfinite(features).all()
    for parameter_name, parameter in pm.prefixes.named_parameters():
        if parameter_name.split(".")[2].startswith("visual"):
            assert parameter.grad.dtype == torch.float32 and parameter.grad.abs().sum() > 0, parameter_name


@pytest.mark.parametrize("name", MODELS)
def test_routed_rows_equal_each_row_alone_and_encode_methods_route_with_using(name):
    pm = add_prefix(tiny.open_clip_model(name), PrefixConfig(num_virtual_tokens=3, init_std=1.0), name="a")
    pm.add_prefix("b", PrefixConfig(num_virtual_tokens=2, init_std=1.0, targets=["*[-1:]"]))
    image = tiny.pixels()
    with torch.no_grad():
        mixed = outputs_with(pm, ["b", "a"])
        for row, prefix in enumerate(["b", "a"]):
            torch.testing.assert_close(mixed[row], outputs_with(pm, prefix)[row], rtol=1e-5, atol=1e-5)
        with pm.using(["a", None]):
            routed = pm.encode_image(image)
        with pm.using("a"):
            first = pm.encode_image(image)[0]
        with pm.using(None):
            second = pm.encode_image(image)[1]
    torch.testing.assert_close(routed, torch.stack([first, second]), rtol=1e-5, atol=1e-5)


def outputs_with(pm, prefix):
    with pm.using(prefix):
        return outputs(pm)


def test_save_and_load_round_trip(tmp_path):
    pm = add_prefix(tiny.open_clip_model("mmprefix-tiny-coca"), PrefixConfig(num_virtual_tokens=3, init_std=1.0))
    pm.save_prefix(tmp_path)
    loaded = load_prefix(tiny.open_clip_model("mmprefix-tiny-coca"), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(outputs(loaded), outputs(pm), rtol=0, atol=0)
    with pytest.raises(ValueError, match="saved for CoCa"):
        load_prefix(tiny.open_clip_model("mmprefix-tiny-clip"), tmp_path)


def test_a_timm_vision_tower_is_named_and_the_text_tower_still_works():
    with pytest.raises(ValueError, match="'vision' tower \\(TimmModel\\).*targets=\\['text'\\]"):
        add_prefix(tiny.open_clip_model("mmprefix-tiny-clip-timm"), PrefixConfig())
    with pytest.raises(ValueError, match="'vision' tower \\(TimmModel\\)"):
        add_prefix(tiny.open_clip_model("mmprefix-tiny-clip-timm"), PrefixConfig(targets=["vision"]))
    pm = add_prefix(tiny.open_clip_model("mmprefix-tiny-clip-timm"), PrefixConfig(num_virtual_tokens=2, targets=["text"]))
    assert {s.tower for s in pm.sites} == {"text"}


def test_text_initialisation_with_an_open_clip_style_processor():
    from open_clip.transform import image_transform

    def tokenizer(texts):
        ids = torch.zeros(len(texts), 12, dtype=torch.long)
        for i, text in enumerate(texts):
            words = [1 + sum(map(ord, w)) % 89 for w in text.split()]
            ids[i, : len(words) + 2] = torch.tensor([tiny.SOT, *words, tiny.EOT])
        return ids

    model = tiny.open_clip_model("mmprefix-tiny-coca")
    pm = add_prefix(model, PrefixConfig(num_virtual_tokens=3, init="text", init_text="a photo of"),
                    processor=(tokenizer, image_transform(32, is_train=False)))
    assert all(pm.prefixes["default"].kv(s.name)[0].abs().sum() > 0 for s in pm.sites)
    with pytest.raises(ValueError, match="processor=\\(tokenizer, preprocess\\)"):
        add_prefix(tiny.open_clip_model(), PrefixConfig(init="text", init_text="a"), processor=tokenizer)


# -- CoCa decoding ------------------------------------------------------------------------------------------
def naive_greedy(model, images, steps):
    tokens = torch.full((images.shape[0], 1), tiny.SOT)
    for _ in range(steps):
        logits = model(images, tokens, output_labels=False)["logits"][:, -1]
        tokens = torch.cat([tokens, logits.argmax(-1, keepdim=True)], dim=1)
    return tokens


def naive_beam(model, image, beams, steps):
    """One image, plain python: keep the `beams` best (score, tokens), full recompute for every beam."""
    alive = [(0.0, [tiny.SOT])]
    for _ in range(steps):
        candidates = []
        for score, tokens in alive:
            if tokens[-1] == tiny.EOT or tokens[-1] == 0 and len(tokens) > 1:
                candidates.append((score, tokens + [0]))
                continue
            logits = model(image, torch.tensor([tokens]), output_labels=False)["logits"][0, -1]
            log_probs = logits.float().log_softmax(-1)
            top = log_probs.topk(beams)
            candidates += [(score + lp.item(), tokens + [t.item()]) for lp, t in zip(top.values, top.indices)]
        alive = sorted(candidates, key=lambda c: -c[0])[:beams]
    return alive[0][1]


def test_coca_greedy_equals_a_naive_full_recompute_loop():
    pm = add_prefix(tiny.open_clip_model("mmprefix-tiny-coca"), PrefixConfig(num_virtual_tokens=3, init_std=1.0))
    images = tiny.pixels()
    with torch.no_grad():
        got = coca_generate(pm, images, sot_token_id=tiny.SOT, eot_token_id=tiny.EOT, max_new_tokens=6)
        expected = naive_greedy(pm, images, 6)
        with pm.disable_prefix():
            plain = coca_generate(pm, images, sot_token_id=tiny.SOT, eot_token_id=tiny.EOT, max_new_tokens=6)
    assert torch.equal(got[:, : expected.shape[1]], expected[:, : got.shape[1]])
    assert not torch.equal(got, plain), "the prefix changes the captions"


def test_coca_beam_search_equals_a_naive_beam_search_and_routes_per_sample():
    pm = add_prefix(tiny.open_clip_model("mmprefix-tiny-coca"), PrefixConfig(num_virtual_tokens=3, init_std=1.0), name="a")
    pm.add_prefix("b", PrefixConfig(num_virtual_tokens=2, init_std=1.0))
    images = tiny.pixels()
    with torch.no_grad():
        got = coca_generate(pm, images, sot_token_id=tiny.SOT, eot_token_id=tiny.EOT, max_new_tokens=5, num_beams=3,
                            prefix=["b", "a"])
        for row, prefix in enumerate(["b", "a"]):
            with pm.using(prefix):
                expected = naive_beam(pm, images[row : row + 1], beams=3, steps=5)
            assert got[row].tolist()[: len(expected)] == expected, f"row {row}"


def test_coca_generate_refuses_other_models():
    with pytest.raises(ValueError, match="needs an open_clip CoCa"):
        coca_generate(tiny.open_clip_model(), tiny.pixels(), sot_token_id=1, eot_token_id=2)


def test_a_transformers_text_tower_in_open_clip_takes_prefixes_through_the_interface(tmp_path):
    """CustomTextCLIP with a BERT text tower (open_clip's HFTextEncoder, here from a local config folder)."""
    import transformers as tf
    from open_clip.model import CustomTextCLIP

    tf.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                  max_position_embeddings=32).save_pretrained(tmp_path)
    torch.manual_seed(0)
    model = CustomTextCLIP(
        embed_dim=16, vision_cfg=tiny.OPEN_CLIP_VISION,
        text_cfg=dict(hf_model_name=str(tmp_path), hf_model_pretrained=False, hf_tokenizer_name=str(tmp_path),
                      hf_proj_type="linear", hf_pooler_type="mean_pooler", context_length=12, vocab_size=100),
    ).eval()
    pm = add_prefix(model, PrefixConfig(num_virtual_tokens=2, init_std=1.0, targets=["text"]))
    assert {(s.tower, s.kind, s.route) for s in pm.sites} == {("text", "self", "interface")}
    ids = torch.randint(1, 90, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        with pm.disable_prefix():
            plain = pm.encode_text(ids)
        assert not torch.allclose(pm.encode_text(ids), plain)
    pm.encode_text(ids).pow(2).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in pm.prefixes.parameters())
