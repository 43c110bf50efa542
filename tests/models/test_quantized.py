"""Frozen bases whose linear weights are quantized by torchao on the CPU (int8, and int4 values stored per byte):
the prefix stays float32 and computes exactly what it computes on the same model with the dequantized weights
in float32; it trains, saves, and loads onto the model that was never quantized."""

from collections import Counter

import pytest
import torch

import tiny
from mmprefix import PrefixConfig, add_prefix, load_prefix
from mmprefix.models import loading
from mmprefix.training import distributed

FAMILIES = ["llama", "blip_vqa", "blip2_opt", "clip"]


def quantized(build, scheme):
    return loading.quantize_weights(build(), scheme)  # what the recipes' quantize= does


def dequantized(build, quantized_model):
    """The float model whose linear weights are the quantized model's, dequantized: the reference."""
    model = build()
    weights = dict(quantized_model.named_modules())
    count = 0
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            module.weight = torch.nn.Parameter(weights[name].weight.dequantize())
            count += 1
    assert count > 0
    return model


def is_quantized(weight):
    return type(weight) is not torch.nn.Parameter and hasattr(weight, "qdata")


def untied_linears(model):
    """The linear layers quantize_weights quantizes: all but those whose weight another module shares."""
    uses = Counter(id(p) for _, p in model.named_parameters(remove_duplicate=False))
    return [m for m in model.modules() if isinstance(m, torch.nn.Linear) and uses[id(m.weight)] == 1]


@pytest.mark.parametrize("scheme", ["int8", "int4"])
@pytest.mark.parametrize("family", FAMILIES)
def test_a_float32_prefix_on_a_quantized_base_equals_the_dequantized_model(family, scheme):
    build, inputs, output = tiny.FAMILIES[family]
    base = quantized(build, scheme)
    linears = untied_linears(base)
    assert linears and all(is_quantized(m.weight) for m in linears)
    with torch.no_grad():
        untouched = output(base(**inputs()))
    pm = add_prefix(base, PrefixConfig(num_virtual_tokens=3, init_std=0.5))
    reference = add_prefix(dequantized(build, base), PrefixConfig(num_virtual_tokens=3))
    reference.prefixes.load_state_dict(pm.prefixes.state_dict())
    assert all(p.dtype == torch.float32 for p in pm.prefixes.parameters())
    with torch.no_grad(), pm.disable_prefix():
        torch.testing.assert_close(output(pm(**inputs())), untouched, rtol=0, atol=0)
    got, expected = output(pm(**inputs())), output(reference(**inputs()))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert (got - untouched).abs().max() > 1e-4, "the prefix changes the output"
    got.float().pow(2).mean().backward()
    expected.float().pow(2).mean().backward()
    for mine, theirs in zip(pm.prefixes.parameters(), reference.prefixes.parameters()):
        assert mine.grad.dtype == torch.float32
        torch.testing.assert_close(mine.grad, theirs.grad, rtol=1e-4, atol=1e-4 * theirs.grad.abs().max().item())


def train_steps(pm, steps=30):
    ids = tiny.tokens(length=8, high=pm.config.vocab_size)
    batch = dict(input_ids=ids, labels=ids)
    optimizer = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=0.1)
    losses = []
    pm.train()
    for _ in range(steps):
        loss = pm(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    pm.eval()
    return losses, batch


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_prefix_trained_on_an_int8_base_saves_and_loads_onto_the_float_model(dtype, tmp_path):
    """bfloat16: the prefix in bf16 by choice (``pm.prefixes.to(torch.bfloat16)``); float32 is the default.
    (A Llama with weights at ten times the default scale: at the default a prefix barely moves the loss.)"""
    pm = add_prefix(quantized(tiny.world_llama, "int8"), PrefixConfig(num_virtual_tokens=4))
    pm.prefixes.to(dtype)
    losses, batch = train_steps(pm)
    assert losses[-1] < 0.7 * losses[0], losses
    assert all(p.dtype == dtype for p in pm.prefixes.parameters())
    pm.save_prefix(tmp_path)
    on_int8 = load_prefix(quantized(tiny.world_llama, "int8"), tmp_path)
    on_float = load_prefix(tiny.world_llama(), tmp_path)
    for loaded in (on_int8, on_float):
        for saved, restored in zip(pm.prefixes.parameters(), loaded.prefixes.parameters()):
            torch.testing.assert_close(restored, saved.float(), rtol=0, atol=0)
    pm.prefixes.float()
    with torch.no_grad():
        trained = pm(**batch).logits
        torch.testing.assert_close(on_int8(**batch).logits, trained, rtol=0, atol=0)
        # on the float model the prefix meets the unquantized weights: it moves the logits as far as
        # quantization alone does, and keeps what it learned
        gap = (on_float.base_model(**batch).logits - pm.base_model(**batch).logits).abs().max()
        assert (on_float(**batch).logits - trained).abs().max() <= 3 * gap
        assert on_float(**batch).loss < 0.7 * losses[0], (on_float(**batch).loss, losses)


def test_recipes_quantize_the_base_when_asked():
    model, _ = loading.load_model("embedded:lm", "text", quantize="int8")
    assert all(is_quantized(m.weight) for m in untied_linears(model))
    with pytest.raises(loading.LoadError, match="quantize must be one of"):
        loading.load_model("embedded:lm", "text", quantize="int3")


@pytest.mark.parametrize("family", ["llama", "blip_vqa"])
def test_gradient_checkpointing_on_an_int8_base(family):
    build, inputs, output = tiny.FAMILIES[family]

    def grads(checkpointing):
        pm = add_prefix(quantized(build, "int8"), PrefixConfig(num_virtual_tokens=3, init_std=0.5))
        for module in pm.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
        if checkpointing:
            pm.gradient_checkpointing_enable()
        pm.train()
        output(pm(**inputs())).float().pow(2).mean().backward()
        return {n: p.grad for n, p in pm.prefixes.named_parameters()}

    plain, checkpointed = grads(False), grads(True)
    for name, grad in plain.items():
        torch.testing.assert_close(checkpointed[name], grad, rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_a_tied_lm_head_stays_tied_and_unquantized(scheme):
    """Quantizing a head tied to the input embedding would untie the two and store the matrix twice."""
    import transformers as tf

    def tied_llama():
        model = tiny.llama()
        return tf.LlamaForCausalLM(tf.LlamaConfig(**{**model.config.to_dict(), "tie_word_embeddings": True})).eval()

    model = quantized(tied_llama, scheme)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert type(model.lm_head.weight) is torch.nn.Parameter
    assert type(model.model.layers[0].self_attn.q_proj.weight) is not torch.nn.Parameter  # quantized


def test_an_open_clip_model_quantizes_and_takes_a_prefix():
    """open_clip's standard blocks use nn.MultiheadAttention, whose output projection torchao cannot serve (before:
    NotImplementedError for aten.t); it stays float, every other linear layer is int8, and a prefix trains."""
    model = loading.quantize_weights(tiny.open_clip_model(), "int8")
    attention = [m for m in model.modules() if isinstance(m, torch.nn.MultiheadAttention)]
    assert attention and all(type(m.out_proj.weight) is torch.nn.Parameter for m in attention)
    assert any(is_quantized(m.weight) for m in model.modules() if isinstance(m, torch.nn.Linear))
    pm = add_prefix(model, PrefixConfig(num_virtual_tokens=3, init_std=0.5))
    images = torch.randn(2, 3, *pm.base_model.visual.image_size)
    (pm.encode_image(images).sum() + pm.encode_text(tiny.open_clip_text()).sum()).pow(2).backward()
    assert all(p.grad is not None for p in pm.prefixes.parameters())


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_sharding_a_quantized_base_is_refused_with_what_to_do(scheme):
    # FSDP2 cannot split torchao's weights (tried on two gloo processes: "Int8Tensor dispatch: ... aten.split")
    pm = add_prefix(quantized(tiny.llama, scheme), PrefixConfig(num_virtual_tokens=3))
    with pytest.raises(ValueError, match="cannot split quantized weights .*q_proj.weight is a .*shard the base "
                                         "unquantized, or train the quantized base without fsdp"):
        distributed.shard(pm, torch.device("cpu"))
