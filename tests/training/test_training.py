"""Training set-ups: gradient checkpointing (BLIP's in-place trap included) and half-precision bases."""

import pytest
import torch

import tiny
from mmprefix import PrefixConfig, add_prefix

FAMILIES = ["blip_vqa", "blip_caption", "blip2_opt", "blip2_t5", "clip", "llama", "gpt2", "t5"]


def without_dropout(model):
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    return model


def loss_and_grads(family, checkpointing):
    build, inputs, output = tiny.FAMILIES[family]
    pm = add_prefix(without_dropout(build()), PrefixConfig(num_virtual_tokens=3, init_std=0.5))
    if checkpointing:
        pm.gradient_checkpointing_enable()
    pm.train()
    loss = output(pm(**inputs())).float().pow(2).mean()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in pm.prefixes.named_parameters()}


@pytest.mark.parametrize("family", FAMILIES)
def test_gradient_checkpointing_gives_the_same_loss_and_gradients(family):
    loss, grads = loss_and_grads(family, checkpointing=False)
    loss_ckpt, grads_ckpt = loss_and_grads(family, checkpointing=True)
    torch.testing.assert_close(loss_ckpt, loss, rtol=1e-5, atol=1e-6)
    assert grads.keys() == grads_ckpt.keys()
    for name in grads:
        torch.testing.assert_close(grads_ckpt[name], grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_gradient_checkpointing_really_recomputes():
    """Inside a checkpointed layer, the prefixed attention runs twice: in forward, and again in backward."""
    build, inputs, output = tiny.FAMILIES["blip_vqa"]
    pm = add_prefix(build(), PrefixConfig(num_virtual_tokens=3))
    pm.gradient_checkpointing_enable()
    pm.train()
    calls = []
    attention = pm.base_model.text_encoder.encoder.layer[0].attention.self
    attention.register_forward_hook(lambda *args: calls.append(torch.is_grad_enabled()))
    output(pm(**inputs())).backward()
    assert len(calls) == 2
    assert pm.prefixes["default"].keys["text_encoder-encoder-layer-0-attention-self"].grad.abs().sum() > 0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("family", ["blip_vqa", "blip2_opt", "llama", "clip"])
def test_half_precision_base_with_float32_prefix_under_autocast(family, dtype):
    build, inputs, output = tiny.FAMILIES[family]
    with torch.no_grad():
        reference_pm = add_prefix(build(), PrefixConfig(num_virtual_tokens=3, init_std=0.5))
        reference = output(reference_pm(**inputs())).float()
    model = build().to(dtype)
    pm = add_prefix(model, PrefixConfig(num_virtual_tokens=3, init_std=0.5))
    pm.prefixes.load_state_dict(reference_pm.prefixes.state_dict())
    assert all(p.dtype == torch.float32 for p in pm.prefixes.parameters())
    assert all(p.dtype == dtype for p in pm.base_model.parameters())
    batch = {k: v.to(dtype) if v.is_floating_point() else v for k, v in inputs().items()}
    with torch.autocast("cpu", dtype=dtype):
        out = output(pm(**batch)).float()
    (out.pow(2).mean() * 1024).backward()  # loss scaling, as fp16 training does, keeps small gradients from underflowing
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, reference, rtol=0.1, atol=0.1)
    for name, parameter in pm.prefixes.named_parameters():
        assert parameter.grad is not None and parameter.grad.dtype == torch.float32, name
        assert torch.isfinite(parameter.grad).all() and parameter.grad.abs().sum() > 0, name


@pytest.mark.parametrize("family", ["blip_caption", "blip2_opt", "llama"])
def test_gradient_checkpointing_recomputes_with_the_calls_own_routing(family):
    """Layers recompute during backward, after the routed call returned: the routing must come back."""
    build, inputs, output = tiny.FAMILIES[family]

    def grads(checkpointing):
        pm = add_prefix(without_dropout(build()), PrefixConfig(num_virtual_tokens=3, init_std=0.5), name="a")
        pm.add_prefix("b", PrefixConfig(num_virtual_tokens=2, init_std=0.5))
        if checkpointing:
            pm.gradient_checkpointing_enable()
        pm.train()
        output(pm(**inputs(), prefix=["b", None])).float().pow(2).mean().backward()
        return {n: p.grad for n, p in pm.prefixes.named_parameters()}

    plain, checkpointed = grads(False), grads(True)
    for name, grad in plain.items():
        if grad is None:
            assert checkpointed[name] is None or checkpointed[name].abs().sum() == 0, name
        else:
            torch.testing.assert_close(checkpointed[name], grad, rtol=1e-4, atol=1e-6, msg=name)
    assert any(g is not None and g.abs().sum() > 0 for n, g in checkpointed.items() if n.startswith("b."))


def test_checkpointing_enabled_behind_the_wrappers_back_is_refused_for_routed_calls():
    pm = add_prefix(tiny.gpt2(), PrefixConfig(num_virtual_tokens=2))
    pm.base_model.gradient_checkpointing_enable()
    pm.train()
    with pytest.raises(ValueError, match="PrefixModel.gradient_checkpointing_enable"):
        pm(input_ids=tiny.tokens(), prefix=[None, "default"])
    pm(input_ids=tiny.tokens())  # the active prefix needs no routing: fine
