"""The methods the recipes compare: each trains what it should and nothing else."""

import pytest
import torch

import tiny
from mmprefix.experiment.methods import METHODS, for_generation, prepare, trainable_parameters
from mmprefix.model import PrefixModel


@pytest.mark.parametrize("family", ["blip_vqa", "blip2_opt", "gpt2", "llama", "t5", "clip"])
@pytest.mark.parametrize("method", METHODS)
def test_each_method_trains_only_its_parameters(family, method):
    build, inputs, output = tiny.FAMILIES[family]
    model = build()
    total = sum(p.numel() for p in model.parameters())
    prepared = prepare(model, method, {"num_virtual_tokens": 4} if method in ("prefix", "prompt") else {"r": 2} if method == "lora" else {})
    trainable, all_parameters = trainable_parameters(prepared)
    names = [n for n, p in prepared.named_parameters() if p.requires_grad]
    if method == "full":
        assert trainable == total
    elif method == "lora":
        assert names and all("lora_" in n for n in names)
    else:
        assert isinstance(prepared, PrefixModel) and all(n.startswith("prefixes.") for n in names)
    assert 0 < trainable <= all_parameters
    output(prepared(**inputs())).float().pow(2).mean().backward()
    assert all(p.grad is not None for n, p in prepared.named_parameters() if p.requires_grad and "lora_A" not in n)
    with torch.no_grad():  # what generation runs computes what was trained
        torch.testing.assert_close(output(for_generation(prepared)(**inputs())), output(prepared(**inputs())),
                                   rtol=0, atol=0)


def test_unknown_method_and_bad_options():
    with pytest.raises(ValueError, match="unknown method 'adapter'; choose from prefix, prompt, lora, full"):
        prepare(tiny.gpt2(), "adapter")
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
