"""PrefixModel on every family: identity when off, effect when on, gradients, freezing, removal, delegation."""

import copy
import io
from contextlib import redirect_stdout

import pytest
import torch
import transformers as tf
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

import tiny
from mmprefix import PrefixConfig, PrefixModel, add_prefix

FAMILIES = sorted(tiny.FAMILIES)


def run(model, family):
    _, inputs, output = tiny.FAMILIES[family]
    return output(model(**inputs()))


@pytest.mark.parametrize("family", FAMILIES)
def test_disabled_and_zero_length_prefix_equal_the_unwrapped_model(family):
    build = tiny.FAMILIES[family][0]
    with torch.no_grad():
        expected = run(build(), family)
        pm = add_prefix(build(), PrefixConfig(num_virtual_tokens=4, init_std=1.0))
        with pm.disable_prefix():
            torch.testing.assert_close(run(pm, family), expected, rtol=0, atol=0)
        changed = run(pm, family)
        empty = add_prefix(build(), PrefixConfig(num_virtual_tokens=0))
        torch.testing.assert_close(run(empty, family), expected, rtol=0, atol=0)
    assert not torch.allclose(changed, expected, atol=1e-4), "an active prefix must change the output"


@pytest.mark.parametrize("family", FAMILIES)
def test_gradients_reach_every_prefix_tensor_and_nothing_else(family):
    pm = add_prefix(tiny.FAMILIES[family][0](), PrefixConfig(num_virtual_tokens=3, init_std=0.5))
    out = run(pm, family)
    (out.float() ** 2).mean().backward()
    prefix_params = dict(pm.prefixes.named_parameters())
    assert prefix_params, "no prefix parameters"
    for name, parameter in prefix_params.items():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, f"no gradient for {name}"
    for name, parameter in pm.base_model.named_parameters():
        assert not parameter.requires_grad and parameter.grad is None, f"base parameter {name} got a gradient"


@pytest.mark.parametrize("family", ["blip_vqa", "blip2_t5", "llama", "clip"])
def test_base_state_dict_untouched_by_wrapping_and_training(family):
    model = tiny.FAMILIES[family][0]()
    before = copy.deepcopy(model.state_dict())
    pm = add_prefix(model, PrefixConfig(num_virtual_tokens=3))
    assert list(model.state_dict()) == list(before), "wrapping must not add or rename base state"
    optimizer = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=0.1)
    for _ in range(2):
        run(pm, family).float().pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), f"{key} changed"


@pytest.mark.parametrize("family", ["blip_caption", "blip2_opt", "gpt2", "clip"])
def test_remove_prefix_gives_back_the_original_model(family):
    build = tiny.FAMILIES[family][0]
    model = build()
    next(model.parameters()).requires_grad_(False)  # a flag the user set must come back too
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    with torch.no_grad():
        expected = run(model, family)
    configs = {n: m.config for n, m in model.named_modules() if hasattr(m, "config")}
    pm = add_prefix(model, PrefixConfig(num_virtual_tokens=3, init_std=1.0))
    restored = pm.remove_prefix()
    assert restored is model
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    for name, module in model.named_modules():
        assert "_mmprefix" not in module.__dict__ and "forward" not in module.__dict__, name
        if name in configs:
            assert module.config is configs[name], name
    with torch.no_grad():
        torch.testing.assert_close(run(model, family), expected, rtol=0, atol=0)
    assert pm.sites == [] and len(pm.prefixes) == 0


@pytest.mark.parametrize("family", FAMILIES)
def test_trainable_count_is_the_sum_over_sites_of_2_P_kv_heads_head_dim(family):
    pm = add_prefix(tiny.FAMILIES[family][0](), PrefixConfig(num_virtual_tokens=5))
    trainable, total = pm.get_nb_trainable_parameters()
    assert trainable == sum(2 * 5 * s.kv_heads * s.head_dim for s in pm.sites)
    assert total == trainable + sum(p.numel() for p in pm.base_model.parameters())


def test_plain_multi_head_count_is_P_hidden_2_layers():
    pm = add_prefix(tiny.gpt2(), PrefixConfig(num_virtual_tokens=7))
    assert pm.get_nb_trainable_parameters()[0] == 7 * 32 * 2 * 2


def test_gqa_prefix_uses_key_value_heads():
    pm = add_prefix(tiny.llama(), PrefixConfig(num_virtual_tokens=7))
    assert {(s.heads, s.kv_heads, s.head_dim) for s in pm.sites} == {(4, 2, 8)}
    assert pm.get_nb_trainable_parameters()[0] == 7 * 2 * 2 * 8 * 2


def test_print_trainable_parameters():
    pm = add_prefix(tiny.gpt2(), PrefixConfig(num_virtual_tokens=7))
    trainable, total = pm.get_nb_trainable_parameters()
    with redirect_stdout(io.StringIO()) as out:
        pm.print_trainable_parameters()
    assert out.getvalue().strip() == (
        f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {100 * trainable / total:.4f}"
    )


def test_methods_and_attributes_are_delegated():
    model = tiny.clip()
    pm = add_prefix(model, PrefixConfig(num_virtual_tokens=3, targets=["vision"], init_std=1.0))
    assert pm.config is model.config
    pixels = tiny.pixels()
    with torch.no_grad():
        features = pm.get_image_features(pixel_values=pixels)
        with pm.disable_prefix():
            plain = pm.get_image_features(pixel_values=pixels)
    assert not torch.allclose(features.pooler_output, plain.pooler_output)


def test_calling_the_wrapped_model_directly_also_uses_the_prefix():
    model = tiny.gpt2()
    ids = tiny.tokens()
    pm = add_prefix(model, PrefixConfig(num_virtual_tokens=3, init_std=1.0))
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, pm(input_ids=ids).logits, rtol=0, atol=0)


def test_unsupported_architecture_names_families_and_target_modules():
    dinov2 = tf.Dinov2Model(tf.Dinov2Config(**tiny.VISION))  # no record, no sub-models
    with pytest.raises(ValueError, match=r"(?s)Supported: clip.*blip.*target_modules"):
        add_prefix(dinov2, PrefixConfig())
    pm = add_prefix(dinov2, PrefixConfig(num_virtual_tokens=2, target_modules=[r"encoder\.layer\.\d+\.attention"]))
    assert len(pm.sites) == 2 and {s.tower for s in pm.sites} == {"model"}
    pixels = tiny.pixels()
    with torch.no_grad():
        with pm.disable_prefix():
            plain = pm(pixel_values=pixels).last_hidden_state
        assert not torch.allclose(pm(pixel_values=pixels).last_hidden_state, plain)


def test_model_without_supported_attention_is_refused():
    with pytest.raises(ValueError, match="no supported attention module"):
        add_prefix(torch.nn.Sequential(torch.nn.Linear(2, 2)), PrefixConfig(target_modules=[".*"]))
    with pytest.raises(ValueError, match="does not know the architecture Sequential"):
        add_prefix(torch.nn.Sequential(torch.nn.Linear(2, 2)), PrefixConfig())


def test_other_attention_implementations_are_refused_clearly():
    AttentionInterface.register("my_attention", sdpa_attention_forward)
    model = tiny.llama()
    model.set_attn_implementation("my_attention")
    with pytest.raises(ValueError, match="set_attn_implementation\\('sdpa'\\)"):
        add_prefix(model, PrefixConfig())
    model.set_attn_implementation("sdpa")
    pm = add_prefix(model, PrefixConfig(num_virtual_tokens=2))
    model.set_attn_implementation("my_attention")  # switching after wrapping is caught at call time
    with pytest.raises(ValueError, match="'my_attention'"):
        pm(input_ids=tiny.tokens())


def test_switching_between_sdpa_and_eager_after_wrapping_keeps_the_result():
    model = tiny.llama()
    pm = add_prefix(model, PrefixConfig(num_virtual_tokens=3, init_std=1.0))
    inputs = dict(input_ids=tiny.tokens(), attention_mask=tiny._padded_mask(tiny.tokens()))
    with torch.no_grad():
        sdpa = pm(**inputs).logits
        model.set_attn_implementation("eager")
        eager = pm(**inputs).logits
    torch.testing.assert_close(sdpa, eager, rtol=1e-5, atol=1e-5)


def test_wrapping_twice_is_refused():
    pm = add_prefix(tiny.gpt2(), PrefixConfig(num_virtual_tokens=2))
    with pytest.raises(ValueError, match="already a PrefixModel"):
        add_prefix(pm, PrefixConfig())
    with pytest.raises(ValueError, match="already carries"):
        add_prefix(pm.base_model, PrefixConfig())


def test_is_a_prefix_model_and_moves_with_to():
    pm = add_prefix(tiny.gpt2(), PrefixConfig(num_virtual_tokens=2))
    assert isinstance(pm, PrefixModel)
    pm.to(torch.float64)
    assert all(p.dtype == torch.float64 for p in pm.parameters())
    with torch.no_grad():
        assert pm(input_ids=tiny.tokens()).logits.dtype == torch.float64


def test_saving_or_merging_with_no_active_prefix_names_what_to_do(tmp_path):
    """After set_prefix(None), save_prefix() and merge_reparam() without a name raised KeyError: None."""
    model = add_prefix(tiny.gpt2(), PrefixConfig(num_virtual_tokens=2), name="a")
    model.set_prefix(None)
    for call in (lambda: model.save_prefix(tmp_path), model.merge_reparam):
        with pytest.raises(ValueError, match=r"no prefix is active \(set_prefix\(None\)\); name one: .*\['a'\]"):
            call()
    model.save_prefix(tmp_path, name="a")
    assert (tmp_path / "prefix.safetensors").exists()
