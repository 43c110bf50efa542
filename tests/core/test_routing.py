"""Many named prefixes on one frozen model, routed per sample, in forward, training and generation."""

import pytest
import torch

import tiny
from mmprefix import PrefixConfig, add_prefix

GREEDY = dict(max_new_tokens=5, do_sample=False)
BEAM = dict(max_new_tokens=5, do_sample=False, num_beams=3)


def two_prefixes(family):
    """'a': 3 slots everywhere; 'b': 5 slots in the last layer of every tower only."""
    pm = add_prefix(tiny.FAMILIES[family][0](), PrefixConfig(num_virtual_tokens=3, init_std=1.0), name="a")
    pm.add_prefix("b", PrefixConfig(num_virtual_tokens=5, init_std=1.0, targets=["*[-1:]"]))
    return pm


@pytest.mark.parametrize("family", tiny.ROW_FAMILIES)
@pytest.mark.parametrize("routing", [["a", "b"], ["b", None]], ids=["a-b", "b-none"])
def test_each_row_of_a_mixed_batch_equals_that_row_with_its_own_prefix(family, routing):
    pm = two_prefixes(family)
    inputs = tiny.FAMILIES[family][1]
    with torch.no_grad():
        mixed = tiny.rows(family, pm(**inputs(), prefix=routing))
        for row, name in enumerate(routing):
            alone = tiny.rows(family, pm(**inputs(), prefix=name))
            torch.testing.assert_close(mixed[row], alone[row], rtol=1e-5, atol=1e-5, msg=f"row {row} ({name})")


@pytest.mark.parametrize("family", sorted(tiny.GENERATORS))
@pytest.mark.parametrize("settings", [GREEDY, BEAM], ids=["greedy", "beam"])
def test_generation_routes_each_sample_through_beam_expansion(family, settings):
    """Same tokens, and the same scores, as each sample generated with its prefix for the whole batch."""
    pm = two_prefixes(family)
    inputs, extra = tiny.GENERATORS[family]
    routing = ["b", "a"]
    scored = dict(output_scores=True, return_dict_in_generate=True)
    beams = settings.get("num_beams", 1)
    with torch.no_grad():
        mixed = pm.generate(**inputs(), **extra, **settings, **scored, prefix=routing)
        for row, name in enumerate(routing):
            alone = pm.generate(**inputs(), **extra, **settings, **scored, prefix=name)
            width = min(mixed.sequences.shape[1], alone.sequences.shape[1])
            assert torch.equal(mixed.sequences[row, :width], alone.sequences[row, :width]), f"row {row} ({name})"
            rows = slice(row * beams, (row + 1) * beams)  # first-step scores of this sample's beams
            torch.testing.assert_close(mixed.scores[0][rows], alone.scores[0][rows], rtol=1e-5, atol=1e-5)


def test_generation_with_one_name_for_the_whole_batch_and_none_for_the_base_model():
    pm = two_prefixes("blip2_opt")
    inputs, extra = tiny.GENERATORS["blip2_opt"]
    with torch.no_grad():
        base = tiny.FAMILIES["blip2_opt"][0]().generate(**inputs(), **GREEDY, output_scores=True, return_dict_in_generate=True)
        none = pm.generate(**inputs(), **GREEDY, prefix=None, output_scores=True, return_dict_in_generate=True)
        pm.set_prefix("b")
        active = pm.generate(**inputs(), **GREEDY)
        named = pm.generate(**inputs(), **GREEDY, prefix="b")
    torch.testing.assert_close(none.scores[0], base.scores[0], rtol=0, atol=0)
    assert torch.equal(active, named)
    assert pm.active_prefix == "b"  # a per-call prefix does not change the active one


@pytest.mark.parametrize("family", ["blip_caption", "blip2_t5", "llama", "clip"])
def test_each_rows_loss_reaches_only_its_own_prefix(family):
    pm = two_prefixes(family)
    out = tiny.rows(family, pm(**tiny.FAMILIES[family][1](), prefix=["a", "b"]))
    out[0].pow(2).mean().backward()  # row 0 uses 'a'
    grads = {n: p.grad for n, p in pm.prefixes.named_parameters()}
    assert all(g is not None and g.abs().sum() > 0 for n, g in grads.items() if n.startswith("a."))
    assert all(g is None or g.abs().sum() == 0 for n, g in grads.items() if n.startswith("b."))


def test_rows_without_a_prefix_give_no_gradient_to_any_prefix():
    pm = two_prefixes("gpt2")
    out = pm(**tiny.FAMILIES["gpt2"][1](), prefix=[None, "a"]).logits
    out[0].pow(2).mean().backward()
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in pm.prefixes.parameters())


def test_routing_errors_come_before_any_compute():
    pm = two_prefixes("gpt2")
    calls = []
    pm.base_model.register_forward_pre_hook(lambda *args: calls.append(1))
    with pytest.raises(ValueError, match="unknown prefix 'c'; this model has \\['a', 'b'\\]"):
        pm(**tiny.FAMILIES["gpt2"][1](), prefix=["a", "c"])
    with pytest.raises(ValueError, match="routing list has 3 entries but the batch has \\[2\\] rows"):
        pm(**tiny.FAMILIES["gpt2"][1](), prefix=["a", "b", "a"])
    with pytest.raises(ValueError, match="unknown prefix 'z'"):
        pm.generate(**tiny.GENERATORS["gpt2"][0](), prefix="z", max_new_tokens=2)
    assert calls == []


def test_gated_and_ungated_prefixes_cannot_share_a_batch():
    pm = two_prefixes("gpt2")
    pm.add_prefix("g", PrefixConfig(num_virtual_tokens=2, gate="scalar"))
    with pytest.raises(ValueError, match="gated and ungated"):
        pm(**tiny.FAMILIES["gpt2"][1](), prefix=["a", "g"])


def test_delete_prefix_restores_sites_no_other_prefix_uses():
    pm = two_prefixes("blip2_opt")
    pm.delete_prefix("a")
    assert pm.active_prefix == "b"
    assert {s.layer for s in pm.sites} == {1}  # 'b' sits in the last layer of every tower only
    for name, module in pm.base_model.named_modules():
        if "layers.0" in name or "layer.0" in name:
            assert "_mmprefix" not in module.__dict__, name
    with pytest.raises(ValueError, match="unknown prefix 'a'"):
        pm.delete_prefix("a")


def test_a_held_store_routes_rows_after_its_name_is_deleted_or_replaced_and_keeps_its_sites():
    """'a' is the only prefix on the first layer: deleting it would give those sites back, but a held 'a' keeps
    them (what a request decoding while its prefix changes relies on)."""
    pm = two_prefixes("llama")
    inputs = tiny.FAMILIES["llama"][1]
    with torch.no_grad():
        before = tiny.rows("llama", pm(**inputs(), prefix="a"))
        held = pm.hold("a")
        pm.delete_prefix("a")
        torch.manual_seed(3)
        pm.add_prefix("a", PrefixConfig(num_virtual_tokens=4, init_std=1.0, targets=["*[-1:]"]))  # a new 'a'
        assert {s.layer for s in pm.sites} == {0, 1}, "the held store keeps its sites"
        mixed = tiny.rows("llama", pm(**inputs(), prefix=[held, "a"]))
        torch.testing.assert_close(mixed[0], before[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(mixed[1], tiny.rows("llama", pm(**inputs(), prefix="a"))[1], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(tiny.rows("llama", pm(**inputs(), prefix=held)), before, rtol=1e-5, atol=1e-5)
    del held, mixed
    pm.hold(None)  # the first hold after the store is gone gives its sites back
    assert {s.layer for s in pm.sites} == {1}
    stranger = add_prefix(tiny.FAMILIES["llama"][0](), PrefixConfig(num_virtual_tokens=2), name="x").prefixes["x"]
    with pytest.raises(ValueError, match="only when its model holds it"):
        pm(**inputs(), prefix=[stranger, "b"])


def test_named_save_and_load_round_trip(tmp_path):
    pm = two_prefixes("blip_caption")
    pm.save_prefix(tmp_path / "b", name="b")
    other = add_prefix(tiny.blip(), PrefixConfig(num_virtual_tokens=2), name="x")
    other.load_prefix("b", tmp_path / "b")
    inputs = tiny.FAMILIES["blip_caption"][1]
    with torch.no_grad():
        torch.testing.assert_close(other(**inputs(), prefix="b").logits, pm(**inputs(), prefix="b").logits, rtol=0, atol=0)
