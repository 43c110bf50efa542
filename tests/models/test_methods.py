"""The methods the recipes compare: each trains what it should and nothing else."""

import pytest
import torch

import tiny
from mmprefix.models.methods import METHODS, for_generation, prepare, trainable_parameters
from mmprefix.core.model import PrefixModel


@pytest.mark.parametrize("family", ["blip_vqa", "blip2_opt", "gpt2", "llama", "t5", "clip"])
@pytest.mark.parametrize("method", METHODS)
def test_each_method_trains_only_its_parameters(family, method):
    build, inputs, output = tiny.FAMILIES[family]
    model = build()
    total = sum(p.numel() for p in model.parameters())
    options = {"prefix": {"num_virtual_tokens": 4}, "prompt": {"num_virtual_tokens": 4}, "lora": {"r": 2},
               "memory": {"num_virtual_tokens": 4, "init_std": 1.0}, "adapter": {"width": 4}}
    prepared = prepare(model, method, options.get(method, {}))
    trainable, all_parameters = trainable_parameters(prepared)
    names = [n for n, p in prepared.named_parameters() if p.requires_grad]
    if method == "full":
        assert trainable == total
    elif method == "lora":
        assert names and all("lora_" in n for n in names)
    elif method == "adapter":
        assert names and all(".down." in n or ".up." in n for n in names)
    else:
        assert isinstance(prepared, PrefixModel) and all(n.startswith("prefixes.") for n in names)
    assert 0 < trainable <= all_parameters
    output(prepared(**inputs())).float().pow(2).mean().backward()
    # LoRA's A and the adapters' down projection get no gradient while their zero-initialised partner is zero
    starting_at_zero = ("lora_A", ".down.", "prefixes.default.keys")
    assert all(p.grad is not None for n, p in prepared.named_parameters()
               if p.requires_grad and not any(part in n for part in starting_at_zero))
    with torch.no_grad():  # what generation runs computes what was trained
        torch.testing.assert_close(output(for_generation(prepared)(**inputs())), output(prepared(**inputs())),
                                   rtol=0, atol=0)


def test_unknown_method_and_bad_options():
    with pytest.raises(ValueError, match="unknown method 'ia3'; choose from prefix, prompt, memory, lora, adapter, full"):
        prepare(tiny.gpt2(), "ia3")
    with pytest.raises(ValueError, match="takes no options"):
        prepare(tiny.gpt2(), "full", {"r": 2})


def test_lora_generation_goes_through_the_adapted_model():
    """The tokens generated for a LoRA model are the adapted model's greedy choices, not the base model's."""
    model = prepare(tiny.gpt2(), "lora", {"r": 2, "init_lora_weights": False}).eval()
    ids = tiny.tokens()
    with torch.no_grad():
        adapted = for_generation(model).generate(input_ids=ids, max_new_tokens=3, do_sample=False, pad_token_id=0)
        seq = ids
        for _ in range(3):
            seq = torch.cat([seq, model(input_ids=seq).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
        plain = tiny.gpt2()(input_ids=ids).logits
    assert torch.equal(adapted, seq)
    assert not torch.allclose(model(input_ids=ids).logits, plain)


LAYERS = {"blip_vqa": 6, "clip": 4, "llama": 2, "gpt2": 2, "t5": 4, "opt": 2}  # of every tower of the tiny models


@pytest.mark.parametrize("family", sorted(LAYERS))
def test_adapters_follow_each_feed_forward_block_and_start_as_the_base_model(family, tmp_path):
    """One adapter per layer of every tower, after the feed-forward output projection (not after attention);
    zero at the start; y = f(x) + up(relu(down(f(x)))) by hand; saved and loaded to the same outputs."""
    from torch.nn import functional as F

    from mmprefix.models import adapters

    build, inputs, output = tiny.FAMILIES[family]
    with torch.no_grad():
        expected = output(build()(**inputs()))
    model = prepare(build(), "adapter", {"width": 3})
    found = adapters.adapters_of(model)
    assert len(found) == LAYERS[family], sorted(found)  # one per layer
    assert not any("attention" in n or "attn" in n for n in found), sorted(found)
    with torch.no_grad():
        torch.testing.assert_close(output(model(**inputs())), expected, rtol=0, atol=0)
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.normal_()
        adapter = next(iter(found.values()))
        x = torch.randn(2, 5, adapter.down.in_features if not hasattr(adapter.wrapped, "in_features")
                        else adapter.wrapped.in_features)
        if hasattr(adapter.wrapped, "nx"):  # GPT-2's Conv1D
            x = torch.randn(2, 5, adapter.wrapped.weight.shape[0])
        y = adapter.wrapped(x)
        torch.testing.assert_close(adapter(x), y + adapter.up(F.relu(adapter.down(y))))
        changed = output(model(**inputs()))
        assert not torch.allclose(changed, expected)
        adapters.save_adapters(model, tmp_path)
        loaded = adapters.load_adapters(build(), tmp_path)
        torch.testing.assert_close(output(loaded(**inputs())), changed, rtol=0, atol=0)
