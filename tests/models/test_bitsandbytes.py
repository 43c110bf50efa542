"""bitsandbytes bases (``from_pretrained(..., quantization_config=BitsAndBytesConfig(...))``, what GPU users load
7B-13B models with; bitsandbytes 0.50 also runs on the CPU): a prefix on an 8-bit or 4-bit base gives the outputs
and gradients of the same prefix on that base dequantized to float32, generates greedily through the KV cache,
stays float32 itself, and loads onto the unquantized model."""

import pytest
import torch
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

import tiny
from mmprefix import PrefixConfig, add_prefix, load_prefix

pytest.importorskip("bitsandbytes")  # in the test extra; a user's install without it skips this file only

SCHEMES = {
    # 8-bit matmuls cast their inputs to float16 (LLM.int8), and on CPUs with AVX-512 the 4-bit kernel keeps its
    # scales in bfloat16 (within 1e-5 of the dequantized model on AVX2-only CPUs): hence the looser tolerances
    "8bit": (BitsAndBytesConfig(load_in_8bit=True), 5e-3),
    "4bit": (BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32), 2e-3),
}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    # 64 wide: on CPUs with AVX-512, bitsandbytes' 4-bit kernel repacks weights in blocks of 64 inputs and fails
    # on narrower layers ("shape '[32, 0]' is invalid"); AVX2-only CPUs take another path
    folder = tmp_path_factory.mktemp("llama")
    tiny.llama(width=64).save_pretrained(folder)
    return folder


def pair(folder, scheme):
    quantization, _ = SCHEMES[scheme]
    quantized = AutoModelForCausalLM.from_pretrained(folder, quantization_config=quantization)
    reference = AutoModelForCausalLM.from_pretrained(folder, quantization_config=quantization)
    reference.dequantize()  # the very weights the quantized layers compute with, as float32 nn.Linear
    reference = reference.float()
    pm = add_prefix(quantized, PrefixConfig(num_virtual_tokens=3, init_std=0.5))
    ref = add_prefix(reference, PrefixConfig(num_virtual_tokens=3))
    ref.prefixes.load_state_dict(pm.prefixes.state_dict())
    return pm, ref


@pytest.mark.parametrize("scheme", SCHEMES)
def test_a_prefix_on_a_bitsandbytes_base_matches_the_dequantized_base(saved, scheme):
    import bitsandbytes as bnb

    pm, ref = pair(saved, scheme)
    assert isinstance(pm.base_model.model.layers[0].self_attn.q_proj, (bnb.nn.Linear8bitLt, bnb.nn.Linear4bit))
    assert all(p.dtype == torch.float32 and p.requires_grad for p in pm.prefixes.parameters())
    tolerance = SCHEMES[scheme][1]
    ids = tiny.tokens(length=6)
    out, expected = pm(input_ids=ids).logits, ref(input_ids=ids).logits
    torch.testing.assert_close(out, expected, rtol=tolerance, atol=tolerance)
    with pm.disable_prefix():
        assert (pm(input_ids=ids).logits - out).abs().max() > 0.05  # the prefix matters here
    out.pow(2).mean().backward()
    expected.pow(2).mean().backward()
    for (name, p), q in zip(pm.prefixes.named_parameters(), ref.prefixes.parameters()):
        # within 10% in norm (the keys' gradients, 1e-4 small here, differ most: up to 5% through the 4-bit
        # kernel's bfloat16 scales); a wrong or missing gradient is ~100% off
        assert (p.grad - q.grad).norm() <= 0.1 * q.grad.norm(), name
    # greedy generation (KV cache) gives the tokens of a full-recompute loop on the same quantized model (the
    # dequantized model's own tokens can flip at near-ties of a random tiny model)
    tokens = ids
    with torch.no_grad():
        for _ in range(4):
            tokens = torch.cat([tokens, pm(input_ids=tokens).logits[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(pm.generate(input_ids=ids, max_new_tokens=4, do_sample=False), tokens)


def test_a_prefix_trained_on_a_4bit_base_loads_onto_the_float_model(saved, tmp_path):
    pm, ref = pair(saved, "4bit")
    optimizer = torch.optim.AdamW(pm.prefixes.parameters(), lr=0.1)
    ids = tiny.tokens(length=6)
    for _ in range(20):
        pm(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    pm.save_prefix(tmp_path / "prefix")
    on_float = load_prefix(AutoModelForCausalLM.from_pretrained(saved), tmp_path / "prefix")
    for (name, p), q in zip(pm.prefixes.named_parameters(), on_float.prefixes.parameters()):
        assert torch.equal(p, q), name
    with torch.no_grad():  # what it learned on the 4-bit weights carries over to the float ones
        def drop(model):
            with model.disable_prefix():
                before = model(input_ids=ids, labels=ids).loss
            return float(before - model(input_ids=ids, labels=ids).loss)

        learned, carried = drop(pm), drop(on_float)
    assert learned > 0.1 and carried > 0.8 * learned, (learned, carried)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_sharding_a_bitsandbytes_base_is_refused(saved, scheme):
    from mmprefix.training import distributed

    pm, _ = pair(saved, scheme)
    with pytest.raises(ValueError, match="cannot split quantized weights"):
        distributed.shard(pm, torch.device("cpu"))
