"""Bases loaded big-model style, with accelerate's hooks moving weights in as each module runs: ``cpu_offload``,
``disk_offload``, and ``from_pretrained(device_map=..., offload_folder=...)`` with a map that keeps part of the
model on the CPU and offloads the rest to disk. A prefix on such a base gives the same outputs, routed batches,
gradients and generated tokens as the same prefix on the base loaded whole, and lives where its module computes."""

import pytest
import torch
from accelerate import cpu_offload, disk_offload, infer_auto_device_map
from accelerate.hooks import AlignDevicesHook, add_hook_to_module

import tiny
from mmprefix import PrefixConfig, add_prefix
from mmprefix.core.devices import execution_device

FAMILIES = ["llama", "blip_vqa", "blip2_opt", "clip"]
MODES = ["cpu_offload", "disk_offload", "device_map"]


def offloaded(model, mode, folder):
    if mode == "cpu_offload":
        return cpu_offload(model, execution_device="cpu")
    if mode == "disk_offload":
        return disk_offload(model, folder / "offload", execution_device="cpu")
    # what from_pretrained(device_map="auto", max_memory=...) does when the model does not fit: half on disk
    half = sum(p.numel() * p.element_size() for p in model.parameters()) // 2
    device_map = infer_auto_device_map(model, max_memory={"cpu": half}, no_split_module_classes=model._no_split_modules)
    assert {"cpu", "disk"} <= set(device_map.values()), device_map
    model.save_pretrained(folder / "weights")
    return type(model).from_pretrained(folder / "weights", device_map=device_map, offload_folder=folder / "offload").eval()


def pair(family, mode, folder, **options):
    """The prefixed base loaded whole, and the same prefixes (``default`` and ``b``) on the offloaded base."""
    build = tiny.FAMILIES[family][0]
    whole = add_prefix(build(), PrefixConfig(num_virtual_tokens=3, init_std=0.5, **options))
    whole.add_prefix("b", PrefixConfig(num_virtual_tokens=2, init_std=0.5, **options))
    offload = add_prefix(offloaded(build(), mode, folder), PrefixConfig(num_virtual_tokens=3, **options))
    offload.add_prefix("b", PrefixConfig(num_virtual_tokens=2, **options))
    offload.prefixes.load_state_dict(whole.prefixes.state_dict())
    return whole, offload


def gradients(pm, family, **call):
    _, inputs, output = tiny.FAMILIES[family]
    pm.zero_grad()
    output(pm(**inputs(), **call)).float().pow(2).mean().backward()
    return {n: p.grad for n, p in pm.prefixes.named_parameters()}


def assert_same(a, b):
    assert a.keys() == b.keys()
    for key in a:
        if a[key] is None or b[key] is None:
            assert a[key] is None and b[key] is None, key
        else:
            torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("family", FAMILIES)
def test_a_prefix_on_an_offloaded_base_gives_the_whole_bases_outputs_gradients_and_tokens(family, mode, tmp_path):
    whole, offload = pair(family, mode, tmp_path)
    _, inputs, output = tiny.FAMILIES[family]
    assert any(p.device.type == "meta" for p in offload.base_model.parameters()), "weights are offloaded"
    for site in offload.sites:
        device = execution_device(offload.base_model.get_submodule(site.name))
        assert {p.device for p in offload.prefixes.parameters()} == {device} == {torch.device("cpu")}
    with torch.no_grad():
        for route in ("default", ["b", None]):
            assert_same({"out": output(offload(**inputs(), prefix=route))}, {"out": output(whole(**inputs(), prefix=route))})
    # gradients in eval mode: several of these models drop out with functional calls no module setting reaches
    assert_same(gradients(offload, family), gradients(whole, family))
    assert_same(gradients(offload, family, prefix=["b", "default"]), gradients(whole, family, prefix=["b", "default"]))
    if family in tiny.GENERATORS and not (family == "blip2_opt" and mode != "device_map"):
        # (BLIP-2's generate reads query_tokens outside any forward: cpu_offload and disk_offload leave them on
        # "meta" and it fails without a prefix too; a device_map keeps them on the main device)
        generation_inputs, extra = tiny.GENERATORS[family]
        with torch.no_grad():
            for route in ("default", ["b", None]):
                kwargs = dict(**generation_inputs(), prefix=route, max_new_tokens=4, num_beams=2, **extra)
                assert offload.generate(**kwargs).tolist() == whole.generate(**kwargs).tolist()


@pytest.mark.parametrize("family", ["llama", "blip_vqa", "clip"])
def test_gradient_checkpointing_and_a_gated_prefix_on_an_offloaded_base(family, tmp_path):
    """Checkpointed layers reload their weights through the hooks when they recompute in backward; a gated prefix
    projects with the output weight outside the module's own forward (BLIP's vision tower)."""
    whole, offload = pair(family, "disk_offload", tmp_path, gate="scalar")
    with torch.no_grad():
        for parameter in whole.prefixes.parameters():
            parameter.normal_()  # open the gates
        offload.prefixes.load_state_dict(whole.prefixes.state_dict())
    for module in [*whole.base_model.modules(), *offload.base_model.modules()]:
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    offload.gradient_checkpointing_enable()
    whole.train()
    offload.train()
    expected = gradients(whole, family)
    assert_same(gradients(offload, family), expected)
    assert all(g is not None and g.abs().sum() > 0 for g in expected.values() if g is not None)


@pytest.mark.parametrize("order", ["offloaded, then prefixed", "prefixed, then offloaded"])
def test_open_clip_attention_holding_its_own_weights_under_offload_hooks(order):
    """open_clip's Attention holds its projection weights itself, so accelerate hooks the module that mmprefix
    gives a replacement forward: the route must run inside the hook, in either order, and remove_prefix must
    leave the offloaded model working."""
    torch.backends.mha.set_fastpath_enabled(False)
    name = "mmprefix-tiny-clip-custom"
    whole = add_prefix(tiny.open_clip_model(name), PrefixConfig(num_virtual_tokens=3, init_std=0.5))
    model = tiny.open_clip_model(name)
    if order.startswith("offloaded"):
        pm = add_prefix(cpu_offload(model, execution_device="cpu"), PrefixConfig(num_virtual_tokens=3))
    else:
        pm = add_prefix(model, PrefixConfig(num_virtual_tokens=3))
        cpu_offload(model, execution_device="cpu")
    pm.prefixes.load_state_dict(whole.prefixes.state_dict())
    images, text = tiny.pixels(), tiny.open_clip_text()
    with torch.no_grad():
        torch.testing.assert_close(pm.encode_image(images), whole.encode_image(images), rtol=0, atol=0)
        torch.testing.assert_close(pm.encode_text(text), whole.encode_text(text), rtol=0, atol=0)
        base = pm.remove_prefix()
        original = tiny.open_clip_model(name)
        torch.testing.assert_close(base.encode_image(images), original.encode_image(images), rtol=0, atol=0)


def test_a_prefix_lives_on_its_modules_execution_device_not_where_the_weights_wait():
    """An offloaded module's weights wait on "meta" (or the CPU) while its hook computes on the execution device;
    the prefix is created there. "meta" stands in for a GPU on this GPU-less machine."""
    model = tiny.llama()
    layer = model.model.layers[1].self_attn
    for linear in (layer.q_proj, layer.k_proj, layer.v_proj, layer.o_proj):
        add_hook_to_module(linear, AlignDevicesHook(execution_device=torch.device("meta")))
    pm = add_prefix(model, PrefixConfig(num_virtual_tokens=2))
    devices = {n: p.device.type for n, p in pm.prefixes.named_parameters()}
    assert devices == {"default.keys.model-layers-0-self_attn": "cpu", "default.values.model-layers-0-self_attn": "cpu",
                       "default.keys.model-layers-1-self_attn": "meta", "default.values.model-layers-1-self_attn": "meta"}


def test_the_training_engine_trains_a_prefix_on_a_disk_offloaded_base_like_on_the_whole_base(tmp_path):
    from mmprefix.training import train
    from train_tiny import Rows, build, make_collate, tiny_config

    whole = build(0.0)  # tiny GPT-2 with a prefix, dropout off
    base = tiny.gpt2()
    for module in base.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    offload = add_prefix(disk_offload(base, tmp_path / "offload", execution_device="cpu"),
                         PrefixConfig(num_virtual_tokens=4))
    offload.prefixes.load_state_dict(whole.prefixes.state_dict())
    for pm, folder in ((whole, "whole"), (offload, "offloaded")):
        train(pm, Rows(), make_collate(False), tiny_config(str(tmp_path / folder), 6))
    trained = dict(whole.prefixes.named_parameters())
    for name, parameter in offload.prefixes.named_parameters():
        torch.testing.assert_close(parameter, trained[name], rtol=0, atol=0)
    assert (tmp_path / "offloaded" / "prefix" / "prefix.safetensors").is_file()
