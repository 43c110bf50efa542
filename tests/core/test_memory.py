"""The decoupled prefix (``method="memory"``): its term against hand-computed references on the interface route
and the hand-written ones, exactness at zero, routing beside plain prefixes, the KV cache, precision, saving and
composition. The family matrix (every class, generation included) is in test_families.py."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch.nn import functional as F

import tiny
from mmprefix import PrefixConfig, add_prefix, compose, load_prefix
from mmprefix.core import saving
from mmprefix.core.attention.memory import Memory, memory_read


def memory_model(build=tiny.gpt2, p=3, **extra):
    """A memory prefix with random keys and values (values start at zero otherwise)."""
    pm = add_prefix(build(), PrefixConfig(num_virtual_tokens=p, method="memory", init_std=1.0, **extra))
    with torch.no_grad():
        for value in pm.prefixes["default"].values.values():
            value.normal_()
    return pm


def reference_read(q, keys, values, scaling):
    """sum_j phi(q)·phi(k_j) v_j / sum_j phi(q)·phi(k_j), phi(x) = elu(x) + 1, q and k scaled by sqrt(scaling),
    slot by slot and head by head (no shared code with the library)."""
    root = scaling**0.5
    phi_q, phi_k = F.elu(q * root) + 1, F.elu(keys * root) + 1  # [B, H, T, d], [H, P, d]
    weights = torch.einsum("bhtd,hpd->bhtp", phi_q, phi_k)
    return torch.einsum("bhtp,hpd->bhtd", weights, values) / weights.sum(-1, keepdim=True)


def test_memory_on_the_interface_route_against_a_hand_computed_reference():
    """GPT-2 layer 0: c_proj(softmax attention over the input + the memory read), per head."""
    pm = memory_model()
    module, store = pm.base_model.transformer.h[0].attn, pm.prefixes["default"]
    out, q, base = tiny.gpt2_attention_by_hand(module)
    with torch.no_grad():
        mixed = base + reference_read(q, *store.kv("transformer.h.0.attn"), 8**-0.5)
        expected = module.c_proj(mixed.transpose(1, 2).reshape(2, 5, 32))
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_memory_on_blips_hand_written_vision_route_against_a_hand_computed_reference():
    pm = memory_model(tiny.blip, p=4)
    module = pm.base_model.vision_model.encoder.layers[0].self_attn
    keys, values = pm.prefixes["default"].kv("vision_model.encoder.layers.0.self_attn")
    h = torch.randn(2, 6, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = module(h)[0]
        q, k, v = module.qkv(h).reshape(2, 6, 3, 4, 8).permute(2, 0, 3, 1, 4)
        base = (q @ k.transpose(-1, -2) * 8**-0.5).softmax(-1) @ v
        expected = module.projection((base + reference_read(q, keys, values, 8**-0.5)).transpose(1, 2).reshape(2, 6, 32))
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_memory_on_torch_multihead_attention_of_open_clip_against_a_hand_computed_reference():
    pm = memory_model(tiny.open_clip_model, p=2)
    site = next(s for s in pm.sites if s.tower == "text" and s.layer == 0)
    module = pm.base_model.get_submodule(site.name)
    keys, values = pm.prefixes["default"].kv(site.name)
    x = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        out = module(x, x, x, need_weights=False)[0]
        q, k, v = (t.view(2, 5, 4, 8).transpose(1, 2) for t in F.linear(x, module.in_proj_weight, module.in_proj_bias).chunk(3, -1))
        base = (q @ k.transpose(-1, -2) * 8**-0.5).softmax(-1) @ v
        expected = module.out_proj((base + reference_read(q, keys, values, 8**-0.5)).transpose(1, 2).reshape(2, 5, 32))
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_memory_on_open_clips_own_attention_with_qk_norm_and_head_scale_against_a_hand_computed_reference():
    pm = memory_model(lambda: tiny.open_clip_model("mmprefix-tiny-clip-custom"), p=3)
    name = "text.transformer.resblocks.0.attn"
    module = pm.base_model.get_submodule(name)
    keys, values = pm.prefixes["default"].kv(name)
    with torch.no_grad():
        module.head_scale.uniform_(0.5, 1.5)
        x = torch.randn(2, 12, 32, generator=torch.Generator().manual_seed(0))
        causal = torch.full((12, 12), float("-inf")).triu(1)
        out = module(x, attn_mask=causal)
        q, k, v = (t.view(2, 12, 4, 8).transpose(1, 2) for t in F.linear(x, module.in_proj_weight, module.in_proj_bias).chunk(3, -1))
        q, k = module.ln_q(q), module.ln_k(k)
        base = (q @ k.transpose(-1, -2) * module.scale + causal).softmax(-1) @ v
        context = (base + reference_read(q, keys, values, module.scale)) * module.head_scale.view(1, 4, 1, 1)
        expected = module.out_proj(context.transpose(1, 2).reshape(2, 12, 32))
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", sorted(tiny.FAMILIES))
def test_a_memory_with_its_values_at_zero_is_the_base_model_bit_for_bit(family):
    """The default start (keys random, values zero) and init="zero", on every route (bit for bit where the model's
    own attention runs, see ``tiny.SDPA_ROUTES``); then trained values change it."""
    build, inputs, read = tiny.FAMILIES[family]
    with torch.no_grad():
        expected = read(build()(**inputs()))
        for init in ("random", "zero"):
            pm = add_prefix(build(), PrefixConfig(num_virtual_tokens=4, method="memory", init=init, init_std=2.0))
            torch.testing.assert_close(read(pm(**inputs())), expected, **tiny.no_op_tolerance(pm))
        for value in pm.prefixes["default"].values.values():
            value.fill_(0.5)
        assert not torch.allclose(read(pm(**inputs())), expected, atol=1e-5)


def test_memory_trains_keys_and_values_and_nothing_else():
    pm = memory_model(tiny.llama)
    F.cross_entropy(pm(input_ids=tiny.tokens()).logits.flatten(0, 1), tiny.tokens().flatten()).backward()
    for name, parameter in pm.prefixes.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name
    assert all(p.grad is None for p in pm.base_model.parameters())


def test_a_long_input_does_not_dilute_the_memory_term():
    """What the memory adds to a query's attention output does not depend on how many keys the input has (a plain
    prefix's share of the softmax shrinks as the input grows)."""
    query = torch.randn(1, 4, 1, 8)
    memory = Memory(torch.randn(1, 4, 3, 8), torch.randn(1, 4, 3, 8))
    term = memory_read(query, memory, 8**-0.5)
    for length in (4, 400):  # the input's keys never enter the read
        assert torch.equal(memory_read(query, memory, 8**-0.5), term)
        keys = torch.randn(1, 4, length, 8)
        share = (torch.cat([memory.keys, keys], 2) @ query.transpose(-1, -2)).softmax(2)[:, :, :3].sum()
        assert share < 4 * 3 / (3 + length) + 1  # the softmax prefix's share falls with the length


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_large_queries_in_half_precision_give_a_finite_term_equal_to_float32(dtype):
    """phi(q)·phi(k) of queries near float16's range overflows when computed in the model's dtype; the read is
    computed in float32 and is a weighted mean of the values, so it fits any dtype the values fit."""
    query = torch.full((1, 2, 3, 64), 300.0)
    query[..., ::2] = -300.0
    memory = Memory(torch.randn(1, 2, 5, 64) * 30, torch.randn(1, 2, 5, 64))
    term = memory_read(query.to(dtype), memory, 64**-0.5)
    assert term.dtype == dtype and torch.isfinite(term).all()
    torch.testing.assert_close(term.float(), memory_read(query, memory, 64**-0.5), rtol=1e-2, atol=1e-2)
    naive = ((F.elu(query.half() / 8**0.5) + 1) @ (F.elu(memory.keys.half() / 8**0.5) + 1).transpose(-1, -2)).sum(-1)
    assert not torch.isfinite(naive).all()  # what computing the normaliser in float16 would give


def test_a_row_that_reads_no_slot_gets_exactly_zero():
    query = torch.randn(2, 4, 3, 8)
    memory = Memory(torch.randn(2, 4, 3, 8), torch.randn(2, 4, 3, 8), torch.tensor([[True, True, False], [False] * 3]))
    term = memory_read(query, memory, None)
    assert torch.equal(term[1], torch.zeros_like(term[1]))
    alone = memory_read(query[:1], Memory(memory.keys[:1, :, :2], memory.values[:1, :, :2]), None)
    torch.testing.assert_close(term[:1], alone)


@pytest.mark.parametrize("build", [tiny.llama, tiny.blip], ids=["llama", "blip"])
def test_memory_plain_prefix_and_no_prefix_rows_in_one_batch_each_equal_the_row_alone(build):
    """Left-padded rows (Llama) and BLIP's hand-written routes: a memory row, a plain prefix row, a row without."""
    pm = memory_model(build, p=3)
    pm.add_prefix("plain", PrefixConfig(num_virtual_tokens=5, init_std=1.0))
    pm.add_prefix("short", PrefixConfig(num_virtual_tokens=2, method="memory", init_std=1.0, targets=["*[-1:]"]))
    with torch.no_grad():
        pm.prefixes["short"].values[next(iter(pm.prefixes["short"].values))].normal_()
    ids = tiny.tokens(batch=4)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding
    batch = dict(input_ids=ids, attention_mask=mask)
    if build is tiny.blip:
        batch["pixel_values"] = tiny.pixels(4)
    routing = ["default", "plain", None, "short"]
    with torch.no_grad():
        mixed = pm(**batch, prefix=routing).logits
        for row, name in enumerate(routing):
            alone = pm(**{k: v[row : row + 1] for k, v in batch.items()}, prefix=name).logits[0]
            real = mask[row].bool()
            torch.testing.assert_close(mixed[row][real], alone[real], rtol=1e-5, atol=1e-5, msg=f"row {row}")


def test_gated_prefixes_and_memories_cannot_share_a_batch():
    pm = memory_model()
    pm.add_prefix("gated", PrefixConfig(num_virtual_tokens=2, gate="head"))
    with pytest.raises(ValueError, match="gated and ungated prefixes cannot share a batch"):
        pm(input_ids=tiny.tokens(), prefix=["default", "gated"])


def test_each_new_query_gets_the_memory_once_with_the_cache_and_through_beams():
    """Greedy decoding with and without the cache equals a full recompute of every step; routed beams too."""
    pm = memory_model(tiny.llama)
    pm.add_prefix("plain", PrefixConfig(num_virtual_tokens=2, init_std=1.0))
    ids = tiny.tokens()
    with torch.no_grad():
        grown = ids
        for _ in range(5):
            grown = torch.cat([grown, pm(input_ids=grown, use_cache=False).logits[:, -1:].argmax(-1)], 1)
        for use_cache in (True, False):
            out = pm.generate(input_ids=ids, max_new_tokens=5, do_sample=False, use_cache=use_cache, pad_token_id=0)
            assert torch.equal(out, grown), use_cache
        mixed = pm.generate(input_ids=ids, max_new_tokens=4, num_beams=3, do_sample=False, pad_token_id=0,
                            prefix=["default", "plain"])
        for row, name in enumerate(["default", "plain"]):
            alone = pm.generate(input_ids=ids[row : row + 1], max_new_tokens=4, num_beams=3, do_sample=False,
                                pad_token_id=0, prefix=name)
            assert mixed[row].tolist() == alone[0].tolist(), name


def test_save_load_and_a_model_with_other_head_sizes_is_refused(tmp_path):
    pm = memory_model(tiny.llama)
    pm.save_prefix(tmp_path / "memory")
    loaded = load_prefix(tiny.llama(), tmp_path / "memory")
    assert loaded.prefixes["default"].config.method == "memory"
    ids = tiny.tokens()
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, pm(input_ids=ids).logits, rtol=0, atol=0)
    with pytest.raises(ValueError) as err:
        load_prefix(tiny.llama(width=64), tmp_path / "memory")
    assert "head_dim differs" in str(err.value) and "\n" not in str(err.value)


def test_a_folder_saved_before_memories_and_conditioning_existed_loads_unchanged(tmp_path):
    """Format-2 metadata without the fields this change added (condition, condition_hidden) reads as before."""
    pm = add_prefix(tiny.gpt2(), PrefixConfig(num_virtual_tokens=3, init_std=1.0))
    pm.save_prefix(tmp_path)
    weights = tmp_path / saving.WEIGHTS_NAME
    meta = json.loads(saving.safetensors_header(weights)[0][saving.METADATA_KEY])
    for added in ("condition", "condition_hidden"):
        del meta["prefix_config"][added]
    save_file(load_file(weights), weights, metadata={"format": "mmprefix", saving.METADATA_KEY: json.dumps(meta)})
    loaded = load_prefix(tiny.gpt2(), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=tiny.tokens()).logits, pm(input_ids=tiny.tokens()).logits,
                                   rtol=0, atol=0)


def test_composing_memories_sums_or_concatenates_their_slots_and_refuses_mixing_methods():
    pm = memory_model(p=3)
    pm.add_prefix("b", PrefixConfig(num_virtual_tokens=3, method="memory", init_std=1.0))
    pm.add_prefix("plain", PrefixConfig(num_virtual_tokens=3))
    site = pm.sites[0].name
    mix = compose(pm, {"default": 0.5, "b": 0.5}, name="mix")
    both = compose(pm, ["default", "b"], name="both")
    assert mix.config.method == both.config.method == "memory" and both.num_virtual_tokens == 6
    a_keys, b_keys = pm.prefixes["default"].kv(site)[0], pm.prefixes["b"].kv(site)[0]
    torch.testing.assert_close(mix.kv(site)[0], 0.5 * a_keys + 0.5 * b_keys)
    torch.testing.assert_close(both.kv(site)[0], torch.cat([a_keys, b_keys], 1))
    with pytest.raises(ValueError, match="cannot compose 'default' .method='memory'. and 'plain' .method='prefix'"):
        compose(pm, ["default", "plain"], name="x")


def test_text_initialisation_starts_the_memory_from_the_models_own_keys_and_values():
    processor = tiny.TinyProcessor()
    plain = add_prefix(tiny.gpt2(), PrefixConfig(num_virtual_tokens=4, init="text", init_text="a red circle"),
                       processor=processor)
    memory = add_prefix(tiny.gpt2(), PrefixConfig(num_virtual_tokens=4, method="memory", init="text",
                                                  init_text="a red circle"), processor=processor)
    for site in plain.sites:
        for got, expected in zip(memory.prefixes["default"].kv(site.name), plain.prefixes["default"].kv(site.name)):
            torch.testing.assert_close(got, expected)


def test_gradient_checkpointing_and_bfloat16_give_the_same_gradients():
    def gradients(checkpointing, dtype):
        pm = memory_model(tiny.llama)
        pm.base_model.to(dtype)
        if checkpointing:
            pm.gradient_checkpointing_enable()
        pm.train()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            pm(input_ids=tiny.tokens(), prefix=["default", None]).logits.float().pow(2).mean().backward()
        return {n: p.grad for n, p in pm.prefixes.named_parameters()}

    reference = gradients(False, torch.float32)
    for name, grad in gradients(True, torch.float32).items():
        torch.testing.assert_close(grad, reference[name], rtol=1e-5, atol=1e-7)
    for name, grad in gradients(False, torch.bfloat16).items():
        assert grad.dtype == torch.float32 and torch.isfinite(grad).all()
        assert F.cosine_similarity(grad.flatten(), reference[name].flatten(), 0) > 0.95, name


def test_memory_options_are_checked():
    with pytest.raises(ValueError, match="takes no gate"):
        PrefixConfig(method="memory", gate="head")
    with pytest.raises(ValueError, match="takes no gate and no position_offset"):
        PrefixConfig(method="memory", position_offset=True)


def test_memory_and_image_conditioned_prefixes_are_served_in_batches_beside_plain_ones(tmp_path):
    """A recipe's memory run folder (memory/memory) and an image-conditioned prefix, served with a plain prefix:
    requests routed through shared batches each equal the prefix alone."""
    import serve_tiny
    from mmprefix.evaluation import decode
    from mmprefix.serving import Job, PrefixService

    vqa, _ = serve_tiny.blip_heads()
    processor = tiny.world_blip_processor()
    configs = {"plain": PrefixConfig(num_virtual_tokens=3, init_std=1.0),
               "mem": PrefixConfig(num_virtual_tokens=3, method="memory", init_std=1.0),
               "cond": PrefixConfig(num_virtual_tokens=3, init_std=1.0, condition="image", condition_hidden=4)}
    for name, config in configs.items():
        pm = add_prefix(vqa, config, name=name)
        with torch.no_grad():
            for parameter in pm.prefixes[name].parameters():
                parameter.normal_()
        pm.save_prefix(tmp_path / name / ("memory/memory" if name == "mem" else ""))
        pm.remove_prefix()
    service = PrefixService(serve_tiny.blip_engines()[:1], tmp_path, max_batch_size=8, window=0.3)
    try:
        names = ["plain", "mem", "cond", None, "cond", "mem"]
        jobs = [Job("vqa", name, serve_tiny.image(i), serve_tiny.QUESTIONS[0], generation=(("max_new_tokens", 5),))
                for i, name in enumerate(names)]
        answers = [future.result(60) for future in [service.submit(job) for job in jobs]]
    finally:
        service.close()
    assert len(set(answers)) > 2, f"the prefixes must change the answers, or the test proves nothing: {answers}"
    for i, (name, answer) in enumerate(zip(names, answers)):
        model = serve_tiny.reference("vqa", None, tmp_path)
        if name is not None:
            model.load_prefix(name, tmp_path / name / ("memory/memory" if name == "mem" else ""))
        expected = decode.answer_questions(model, processor, [serve_tiny.image(i)], [serve_tiny.QUESTIONS[0]],
                                           max_new_tokens=5)
        assert answer == expected[0], (name, i)
