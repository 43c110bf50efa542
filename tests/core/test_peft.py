"""PEFT interop: a PEFT PrefixTuning adapter folder loads into mmprefix and reproduces PEFT's outputs.

Logits are compared with PEFT's own forward. PEFT 0.21's own generate() cannot serve as the reference with
transformers 5.x: it injects the prefix as ``past_key_values`` while generation passes ``cache``, so the
prefix is dropped and its extended mask misaligned. Generation is therefore compared with
PEFT's forward driven by transformers' generation loop (no cache, full recompute at every step).
"""

import types

import pytest
import torch
from peft import PrefixTuningConfig, get_peft_model
from transformers.modeling_outputs import CausalLMOutputWithPast

import tiny
from mmprefix import PrefixConfig, load_prefix

FAMILIES = ["gpt2", "opt", "llama"]
P = 5


def peft_adapter(family, projection, directory):
    config = PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P, prefix_projection=projection,
                                encoder_hidden_size=24)
    peft_model = get_peft_model(getattr(tiny, family)(), config)
    with torch.no_grad():
        for parameter in peft_model.prompt_encoder.parameters():
            parameter.normal_(std=0.5)
    peft_model.save_pretrained(directory)
    return peft_model.eval()


def left_padded(pad):
    ids = torch.randint(3, 100, (3, 9), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    mask[2, :6] = 0  # more pads than prefix slots
    return ids.masked_fill(mask == 0, pad), mask


def pad_id(family):
    return 1 if family == "opt" else 0


@pytest.fixture(params=[(f, proj) for f in FAMILIES for proj in (False, True)], ids=lambda p: f"{p[0]}-proj{int(p[1])}")
def pair(request, tmp_path):
    family, projection = request.param
    peft_model = peft_adapter(family, projection, tmp_path)
    return family, peft_model, load_prefix(getattr(tiny, family)(), tmp_path)


def test_logits_match_peft_plain_and_padded(pair):
    family, peft_model, ours = pair
    ids, mask = left_padded(pad_id(family))
    with torch.no_grad():
        plain = (peft_model(input_ids=ids).logits - ours(input_ids=ids).logits).abs().max()
        padded = peft_model(input_ids=ids, attention_mask=mask).logits - ours(input_ids=ids, attention_mask=mask).logits
    assert plain <= 1e-4
    assert padded[mask.bool()].abs().max() <= 1e-4  # pad positions are never read


def peft_driven(family, peft_model):
    """A model whose forward is PEFT's forward on the whole sequence, for transformers' generation loop."""
    driver = getattr(tiny, family)()

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, **kwargs):
        logits = peft_model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                            use_cache=False).logits
        return CausalLMOutputWithPast(logits=logits)

    driver.forward = types.MethodType(forward, driver)
    return driver


@pytest.mark.parametrize("settings", [dict(), dict(num_beams=3, num_return_sequences=3)], ids=["greedy", "beam"])
def test_generation_matches_peft_left_padded(pair, settings):
    family, peft_model, ours = pair
    ids, mask = left_padded(pad_id(family))
    common = dict(max_new_tokens=8, do_sample=False, pad_token_id=pad_id(family), output_scores=True,
                  return_dict_in_generate=True, **settings)
    with torch.no_grad():
        reference = peft_driven(family, peft_model).generate(input_ids=ids, attention_mask=mask, use_cache=False, **common)
        got = ours.generate(input_ids=ids, attention_mask=mask, **common)
    assert torch.equal(got.sequences, reference.sequences)
    assert max((a - b).abs().max() for a, b in zip(got.scores, reference.scores)) <= 1e-4


def test_peft_prefix_and_mmprefix_prefix_can_coexist_with_their_own_positions(tmp_path):
    """position_offset follows the active prefix: switching to an mmprefix prefix drops the shift."""
    peft_model = peft_adapter("gpt2", False, tmp_path)
    ours = load_prefix(tiny.gpt2(), tmp_path, name="peft")
    ours.add_prefix("native", PrefixConfig(num_virtual_tokens=0))
    ids = tiny.tokens()
    with torch.no_grad():
        ours.set_prefix("native")
        native = ours(input_ids=ids).logits
        torch.testing.assert_close(native, tiny.gpt2()(input_ids=ids).logits, rtol=0, atol=0)
        ours.set_prefix("peft")
        torch.testing.assert_close(ours(input_ids=ids).logits, peft_model(input_ids=ids).logits, rtol=0, atol=1e-4)


def test_other_peft_adapters_are_refused(tmp_path):
    from peft import LoraConfig

    get_peft_model(tiny.gpt2(), LoraConfig(target_modules=["c_attn"])).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="LORA adapter; only PREFIX_TUNING"):
        load_prefix(tiny.gpt2(), tmp_path)


def test_peft_adapter_for_another_model_is_refused(tmp_path):
    peft_adapter("gpt2", False, tmp_path)
    with pytest.raises(ValueError, match="does not fit LlamaForCausalLM: key/value heads x head_dim: adapter 4x8, model 2x8"):
        load_prefix(tiny.llama(), tmp_path)
