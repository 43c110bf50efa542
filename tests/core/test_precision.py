"""Half precision with a vision tower whose activations exceed float16's range (as BLIP-2's EVA ViT does, LAVIS
#409): float16 gives NaN, bfloat16 does not; `keep_in_float32` runs the tower in float32 inside a float16 model
(weights, or autocast), so outputs stay finite and close to float32 and the prefix trains."""

import pytest
import torch

import tiny
from mmprefix import PrefixConfig, add_prefix
from mmprefix.core.precision import keep_in_float32

FAMILIES = ["blip2_opt", "blip_vqa", "clip"]


def loud(family):
    """The tiny model with vision MLP weights scaled up 3000x: its vision activations pass 1e5 (float16 ends at
    65504) while float32 and the rest of the model are unaffected."""
    model = tiny.FAMILIES[family][0]()
    with torch.no_grad():
        for layer in model.vision_model.encoder.layers:
            layer.mlp.fc1.weight.mul_(3000)
            layer.mlp.fc2.weight.mul_(3000)
    return model


def run(model, family, dtype, autocast=False, **call):
    _, inputs, output = tiny.FAMILIES[family]
    batch = {k: v.to(dtype) if v.is_floating_point() and not autocast else v for k, v in inputs().items()}
    with torch.autocast("cpu", dtype=dtype, enabled=autocast):
        return output(model(**batch, **call)).float()


@pytest.mark.parametrize("family", FAMILIES)
def test_a_vision_tower_that_overflows_float16_runs_in_float32_inside_a_float16_model(family):
    with torch.no_grad():
        reference = run(loud(family), family, torch.float32)
        assert torch.isfinite(reference).all()
        assert not torch.isfinite(run(loud(family).half(), family, torch.float16)).all(), "float16 overflows"
        assert torch.isfinite(run(loud(family).bfloat16(), family, torch.bfloat16)).all(), "bfloat16 does not"
    model = loud(family).half()
    keep_in_float32(model, ["vision"])
    assert {p.dtype for p in model.vision_model.parameters()} == {torch.float32}
    assert {p.dtype for n, p in model.named_parameters() if not n.startswith("vision_model.")} == {torch.float16}
    pm = add_prefix(model, PrefixConfig(num_virtual_tokens=3, init_std=0.5))
    with torch.no_grad(), pm.disable_prefix():
        torch.testing.assert_close(run(pm, family, torch.float16), reference, rtol=0.02, atol=0.02)
    pm.train()
    out = run(pm, family, torch.float16)
    assert torch.isfinite(out).all()
    out.pow(2).mean().backward()
    grads = {n: p.grad for n, p in pm.prefixes.named_parameters()}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
    assert any(g.abs().sum() > 0 for n, g in grads.items() if "vision" in n), "the vision prefix trains in float32"


@pytest.mark.parametrize("family", ["blip2_opt", "clip"])
def test_float16_autocast_on_float32_weights_keeps_the_tower_out_of_autocast(family):
    """Mixed precision (float32 weights, float16 autocast, as accelerate's fp16 does) with checkpointing."""
    with torch.no_grad():
        reference = run(loud(family), family, torch.float32)
        assert not torch.isfinite(run(loud(family), family, torch.float16, autocast=True)).all()
    model = loud(family)
    keep_in_float32(model, ["vision"])
    pm = add_prefix(model, PrefixConfig(num_virtual_tokens=3, init_std=0.5))
    with pm.disable_prefix(), torch.no_grad():
        torch.testing.assert_close(run(pm, family, torch.float16, autocast=True), reference, rtol=0.02, atol=0.02)
    pm.gradient_checkpointing_enable()
    pm.train()
    out = run(pm, family, torch.float16, autocast=True)
    assert torch.isfinite(out).all()
    out.pow(2).mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in pm.prefixes.parameters() if p.grad is not None)


def test_bfloat16_autocast_with_checkpointing_trains_a_prefix_without_overflow():
    model = loud("blip2_opt")
    pm = add_prefix(model, PrefixConfig(num_virtual_tokens=3, init_std=0.5))
    pm.gradient_checkpointing_enable()
    pm.train()
    out = run(pm, "blip2_opt", torch.bfloat16, autocast=True)
    out.pow(2).mean().backward()
    assert torch.isfinite(out).all()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in pm.prefixes.parameters())


def test_a_tower_the_model_does_not_have_is_refused():
    with pytest.raises(ValueError, match=r"LlamaForCausalLM has no 'vision' tower of its own"):
        keep_in_float32(tiny.llama(), ["vision"])
