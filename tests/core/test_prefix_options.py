"""Reparameterisation, initialisation, gates and composition of prefixes."""

import json

import pytest
import torch
from safetensors.torch import load_file

import tiny
from mmprefix import PrefixConfig, add_prefix, compose, load_prefix
from mmprefix.core.text_init import load_image


def run(pm, family, **kwargs):
    _, inputs, output = tiny.FAMILIES[family]
    return output(pm(**inputs(), **kwargs))


# -- reparameterisation -------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["blip_caption", "blip2_t5", "llama"])
def test_reparam_trains_embedding_and_mlp_and_merges_to_identical_outputs(family):
    pm = add_prefix(tiny.FAMILIES[family][0](), PrefixConfig(num_virtual_tokens=4, reparam="mlp", reparam_hidden=24))
    store = pm.prefixes["default"]
    widths = sum(2 * s.kv_heads * s.head_dim for s in pm.sites)
    assert pm.get_nb_trainable_parameters()[0] == 4 * 24 + (24 * 24 + 24) + (24 * widths + widths)
    run(pm, family).float().pow(2).mean().backward()
    assert store.embedding.grad.abs().sum() > 0 and store.mlp[2].weight.grad.abs().sum() > 0
    with torch.no_grad():
        before = run(pm, family)
        merged = pm.merge_reparam()
        assert merged.config.reparam is None and not hasattr(merged, "mlp")
        torch.testing.assert_close(run(pm, family), before, rtol=0, atol=0)
    assert pm.get_nb_trainable_parameters()[0] == sum(2 * 4 * s.kv_heads * s.head_dim for s in pm.sites)


def test_saving_a_reparameterised_prefix_writes_flat_keys_and_values(tmp_path):
    pm = add_prefix(tiny.gpt2(), PrefixConfig(num_virtual_tokens=4, reparam="mlp", reparam_hidden=16))
    pm.save_prefix(tmp_path / "flat")
    pm.save_prefix(tmp_path / "resume", keep_reparam=True)
    flat = load_file(tmp_path / "flat" / "prefix.safetensors")
    assert sorted(flat) == sorted(f"transformer.h.{i}.attn.{p}" for i in (0, 1) for p in ("key", "value"))
    assert json.loads((tmp_path / "flat" / "prefix_config.json").read_text())["prefix_config"]["reparam"] is None
    assert "reparam.mlp.2.weight" in load_file(tmp_path / "resume" / "prefix.safetensors")
    ids = tiny.tokens()
    with torch.no_grad():
        expected = pm(input_ids=ids).logits
        as_flat = load_prefix(tiny.gpt2(), tmp_path / "flat")
        resumed = load_prefix(tiny.gpt2(), tmp_path / "resume")
        torch.testing.assert_close(as_flat(input_ids=ids).logits, expected, rtol=0, atol=0)
        torch.testing.assert_close(resumed(input_ids=ids).logits, expected, rtol=0, atol=0)
    assert resumed.prefixes["default"].config.reparam == "mlp"  # training can go on with the MLP
    assert torch.equal(resumed.prefixes["default"].mlp[2].weight, pm.prefixes["default"].mlp[2].weight)


# -- initialisation -----------------------------------------------------------------------------------------
def test_zero_and_random_initialisation():
    zero = add_prefix(tiny.gpt2(), PrefixConfig(num_virtual_tokens=64, init="zero"))
    assert all(p.abs().sum() == 0 for p in zero.prefixes.parameters())
    random = add_prefix(tiny.gpt2(), PrefixConfig(num_virtual_tokens=64, init_std=0.3))
    values = torch.cat([p.flatten() for p in random.prefixes.parameters()])
    assert abs(values.std().item() - 0.3) < 0.02 and abs(values.mean().item()) < 0.02
    zero_mlp = add_prefix(tiny.gpt2(), PrefixConfig(num_virtual_tokens=4, init="zero", reparam="mlp", reparam_hidden=8))
    assert all(k.abs().sum() == 0 for s in zero_mlp.sites for k in zero_mlp.prefixes["default"].kv(s.name))


def gpt2_keys_values(model, ids):
    """Independent reference: every layer's keys and values from the hidden states and the layer weights."""
    with torch.no_grad():
        hidden = model(input_ids=ids, output_hidden_states=True).hidden_states
        out = []
        for layer, states in zip(model.transformer.h, hidden):
            _, k, v = layer.attn.c_attn(layer.ln_1(states)).split(32, dim=2)
            out.append((k[0].view(-1, 4, 8).transpose(0, 1), v[0].view(-1, 4, 8).transpose(0, 1)))
    return out


@pytest.mark.parametrize("reparam", [None, "mlp"])
def test_text_initialisation_uses_the_models_own_keys_and_values(reparam):
    processor = tiny.TinyProcessor()
    text = "answer the question in one word"  # 6 tokens, cycled to P=8
    reference = gpt2_keys_values(tiny.gpt2(), processor(text=text)["input_ids"])
    pm = add_prefix(tiny.gpt2(), PrefixConfig(num_virtual_tokens=8, init="text", init_text=text, reparam=reparam,
                                              reparam_hidden=16), processor=processor)
    cycle = torch.arange(8) % 6
    for layer, (keys, values) in enumerate(reference):
        got_keys, got_values = pm.prefixes["default"].kv(f"transformer.h.{layer}.attn")
        torch.testing.assert_close(got_keys, keys[:, cycle], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(got_values, values[:, cycle], rtol=1e-4, atol=1e-5)


def test_text_initialisation_of_vision_sites_reads_the_image():
    """CLIP vision keys of layer 0 come from the patch embeddings of the given image."""
    model = tiny.clip()
    pm = add_prefix(model, PrefixConfig(num_virtual_tokens=4, init="text", init_text="a photo", targets=["vision[:1]"]),
                    processor=tiny.TinyProcessor())
    grey = tiny.TinyProcessor()(images=load_image(None))["pixel_values"]
    with torch.no_grad():
        states = model.vision_model.pre_layrnorm(model.vision_model.embeddings(grey))
        attention = model.vision_model.encoder.layers[0]
        keys = attention.self_attn.k_proj(attention.layer_norm1(states))[0, :4].view(4, 4, 8).transpose(0, 1)
    got, _ = pm.prefixes["default"].kv("vision_model.encoder.layers.0.self_attn")
    torch.testing.assert_close(got, keys, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family", sorted(tiny.FAMILIES))
def test_text_initialisation_reaches_every_site_of_every_family(family):
    pm = add_prefix(tiny.FAMILIES[family][0](), PrefixConfig(num_virtual_tokens=3, init="text", init_text="what is it"),
                    processor=tiny.processor(family))
    store = pm.prefixes["default"]
    for site in pm.sites:
        keys, values = store.kv(site.name)
        assert keys.abs().sum() > 0 and values.abs().sum() > 0, site.name


def test_text_initialisation_with_a_real_blip_processor_and_image(tmp_path):
    from PIL import Image

    Image.new("RGB", (40, 30), (200, 20, 20)).save(tmp_path / "red.png")
    config = PrefixConfig(num_virtual_tokens=3, init="text", init_text="what color", init_image=str(tmp_path / "red.png"))
    red = add_prefix(tiny.blip(), config, processor=tiny.blip_processor())
    grey = add_prefix(tiny.blip(), PrefixConfig(num_virtual_tokens=3, init="text", init_text="what color"),
                      processor=tiny.blip_processor())
    site = "vision_model.encoder.layers.0.self_attn"
    assert not torch.allclose(red.prefixes["default"].kv(site)[0], grey.prefixes["default"].kv(site)[0])


def test_text_initialisation_errors():
    with pytest.raises(ValueError, match='needs the text'):
        PrefixConfig(init="text")
    with pytest.raises(ValueError, match="needs the model's processor"):
        add_prefix(tiny.gpt2(), PrefixConfig(init="text", init_text="hello"))
    with pytest.raises(ValueError, match="cannot read init_image"):
        add_prefix(tiny.clip(), PrefixConfig(init="text", init_text="a", init_image="/nowhere.png"),
                   processor=tiny.TinyProcessor())


# -- gates --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", sorted(tiny.FAMILIES))
def test_closed_gate_equals_the_base_model_exactly_whatever_the_prefix(family):
    build = tiny.FAMILIES[family][0]
    with torch.no_grad():
        expected = run(build(), family)
        pm = add_prefix(build(), PrefixConfig(num_virtual_tokens=4, init_std=3.0, gate="head"))
        torch.testing.assert_close(run(pm, family), expected, **tiny.no_op_tolerance(pm))


@pytest.mark.parametrize("family", ["blip_caption", "blip2_opt", "t5"])
def test_gates_learn_first_then_the_prefix(family):
    pm = add_prefix(tiny.FAMILIES[family][0](), PrefixConfig(num_virtual_tokens=4, init_std=1.0, gate="scalar"))
    run(pm, family).float().pow(2).mean().backward()
    store = pm.prefixes["default"]
    assert all(g.grad.abs().sum() > 0 for g in store.gates.values())
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in [*store.keys.values(), *store.values.values()])
    with torch.no_grad():
        for gate in store.gates.values():
            gate.fill_(0.5)
    pm.zero_grad()
    run(pm, family).float().pow(2).mean().backward()
    assert all(p.grad.abs().sum() > 0 for p in [*store.keys.values(), *store.values.values()])


def test_gated_attention_against_a_hand_computed_reference():
    """out = attention(q, K, V) + tanh(g) * softmax(q Kp^T / sqrt(d)) Vp, per head, before the output projection."""
    model = tiny.gpt2()
    pm = add_prefix(model, PrefixConfig(num_virtual_tokens=3, init_std=1.0, gate="head"))
    store = pm.prefixes["default"]
    name = "transformer.h.0.attn"
    with torch.no_grad():
        store.gate(name).copy_(torch.tensor([0.3, -0.7, 1.2, 0.0]))
    module = model.transformer.h[0].attn
    out, q, base = tiny.gpt2_attention_by_hand(module)
    with torch.no_grad():
        pk, pv = store.kv(name)
        extra = (q @ pk.transpose(-1, -2) / 8**0.5).softmax(-1) @ pv
        mixed = base + torch.tanh(store.gate(name))[None, :, None, None] * extra
        expected = module.c_proj(mixed.transpose(1, 2).reshape(2, 5, 32))
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_gates_save_and_load(tmp_path):
    pm = add_prefix(tiny.blip(), PrefixConfig(num_virtual_tokens=2, init_std=1.0, gate="head"))
    with torch.no_grad():
        for gate in pm.prefixes["default"].gates.values():
            gate.uniform_(-1, 1)
    pm.save_prefix(tmp_path)
    loaded = load_prefix(tiny.blip(), tmp_path)
    inputs = tiny.FAMILIES["blip_caption"][1]
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs()).logits, pm(**inputs()).logits, rtol=0, atol=0)


# -- composition --------------------------------------------------------------------------------------------
def three(family="gpt2", **extra):
    pm = add_prefix(tiny.FAMILIES[family][0](), PrefixConfig(num_virtual_tokens=3, init_std=1.0, **extra), name="a")
    pm.add_prefix("b", PrefixConfig(num_virtual_tokens=3, init_std=1.0, **extra))
    pm.add_prefix("c", PrefixConfig(num_virtual_tokens=2, init_std=1.0, **extra))
    return pm


def test_weighted_sum():
    pm = three()
    mix = compose(pm, {"a": 0.7, "b": 0.3}, name="mix")
    for site in pm.sites:
        for i in range(2):
            expected = 0.7 * pm.prefixes["a"].kv(site.name)[i] + 0.3 * pm.prefixes["b"].kv(site.name)[i]
            torch.testing.assert_close(mix.kv(site.name)[i], expected, rtol=0, atol=1e-7)
    with torch.no_grad():
        routed = pm(**tiny.FAMILIES["gpt2"][1](), prefix=["mix", "a"]).logits
        alone = pm(**tiny.FAMILIES["gpt2"][1](), prefix="mix").logits
    torch.testing.assert_close(routed[0], alone[0], rtol=1e-5, atol=1e-5)


def test_concatenation_is_attention_over_both_prefixes(tmp_path):
    pm = three()
    both = compose(pm, ["a", "c"], name="both")
    assert both.num_virtual_tokens == 5
    site = pm.sites[0].name
    torch.testing.assert_close(both.kv(site)[0], torch.cat([pm.prefixes["a"].kv(site)[0], pm.prefixes["c"].kv(site)[0]], 1))
    pm.save_prefix(tmp_path, name="both")
    reloaded = load_prefix(tiny.gpt2(), tmp_path)
    ids = tiny.tokens()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, pm(input_ids=ids, prefix="both").logits, rtol=0, atol=0)


def test_composition_errors(tmp_path):
    pm = three()
    with pytest.raises(ValueError, match="same length"):
        compose(pm, {"a": 0.5, "c": 0.5}, name="x")
    pm.add_prefix("last", PrefixConfig(num_virtual_tokens=3, targets=["lm[-1:]"]))
    with pytest.raises(ValueError, match="different attention sites"):
        compose(pm, ["a", "last"], name="x")
    with pytest.raises(ValueError, match="unknown prefix 'nope'"):
        compose(pm, ["a", "nope"], name="x")
    add_prefix(tiny.llama(), PrefixConfig(num_virtual_tokens=3)).save_prefix(tmp_path / "llama")
    with pytest.raises(ValueError, match="saved for LlamaForCausalLM"):
        compose(pm, {"a": 0.5, str(tmp_path / "llama"): 0.5}, name="x")
    gated = three(gate="scalar")
    with pytest.raises(ValueError, match="cannot be concatenated"):
        compose(gated, ["a", "b"], name="x")
    assert set(pm.prefixes) == {"a", "b", "c", "last"}  # nothing half-made is left behind


def test_composing_a_folder_of_the_same_model(tmp_path):
    pm = three()
    other = add_prefix(tiny.gpt2(), PrefixConfig(num_virtual_tokens=3, init_std=1.0))
    other.save_prefix(tmp_path)
    mix = compose(pm, {"a": 0.5, str(tmp_path): 0.5}, name="mix")
    site = pm.sites[0].name
    expected = 0.5 * pm.prefixes["a"].kv(site)[0] + 0.5 * other.prefixes["default"].kv(site)[0]
    torch.testing.assert_close(mix.kv(site)[0], expected)
    assert set(pm.prefixes) == {"a", "b", "c", "mix"}


def test_gits_gated_attention_adds_the_hand_computed_gated_term():
    """GIT's hand-written text attention (attention/git.py): its own output plus tanh(g) softmax(q Kp^T / sqrt(d)) Vp."""
    from tiny_families import CASES

    pm = add_prefix(CASES["git"].build(), PrefixConfig(num_virtual_tokens=3, init_std=1.0, gate="head", targets=["lm"]))
    store, name = pm.prefixes["default"], "git.encoder.layer.0.attention.self"
    module = pm.base_model.get_submodule(name)
    with torch.no_grad():
        store.gate(name).copy_(torch.linspace(-1.0, 1.2, store.gate(name).numel()))
        h = torch.randn(2, 5, module.query.in_features, generator=torch.Generator().manual_seed(0))
        gated = module(h)[0]
        with pm.disable_prefix():
            own = module(h)[0]
        heads, dim = store.gate(name).numel(), module.attention_head_size
        q = module.query(h).view(2, 5, heads, dim).transpose(1, 2)
        pk, pv = store.kv(name)
        extra = (q @ pk.transpose(-1, -2) / dim**0.5).softmax(-1) @ pv
        expected = own + (torch.tanh(store.gate(name))[None, :, None, None] * extra).transpose(1, 2).reshape(2, 5, -1)
    torch.testing.assert_close(gated, expected, rtol=1e-5, atol=1e-5)
