"""Soft prompts (method="prompt"): the model with the prompt equals the model reading those vectors as tokens."""

import pytest
import torch
import transformers as tf

import tiny
from mmprefix import PrefixConfig, add_prefix, load_prefix
from mmprefix.core.architectures import prompt_input

TEXT_FAMILIES = sorted(f for f in tiny.FAMILIES if f not in ("clip_vision", "clip_vision_proj"))
WORDS = torch.tensor([11, 12, 13])  # the tokens whose embeddings the reference prompt copies


def prompted_by_words(family, name="default"):
    """A soft prompt set to the embeddings of WORDS: it must act exactly like those tokens in the input."""
    pm = add_prefix(tiny.FAMILIES[family][0](), PrefixConfig(num_virtual_tokens=3, method="prompt"), name=name)
    where = prompt_input(pm.base_model)
    with torch.no_grad():
        pm.prefixes[name].embeddings.copy_(where.embedding.weight[WORDS])
    return pm, where


def with_words(inputs, where):
    """The reference call: WORDS inserted as real tokens at the prompt column (labels -100 there)."""
    out = dict(inputs)
    ids = inputs["input_ids"]
    col, batch = where.column, ids.shape[0]
    out["input_ids"] = torch.cat([ids[:, :col], WORDS.expand(batch, -1), ids[:, col:]], dim=1)
    mask = inputs.get("attention_mask", torch.ones_like(ids))
    out["attention_mask"] = torch.cat([mask[:, :col], torch.ones(batch, 3, dtype=mask.dtype), mask[:, col:]], dim=1)
    if where.labels_follow_input and "labels" in inputs:
        labels = inputs["labels"]
        out["labels"] = torch.cat([labels[:, :col], torch.full((batch, 3), -100), labels[:, col:]], dim=1)
    return out


@pytest.mark.parametrize("family", TEXT_FAMILIES)
def test_a_prompt_equals_the_same_vectors_read_as_tokens(family):
    build, inputs, output = tiny.FAMILIES[family]
    pm, where = prompted_by_words(family)
    with torch.no_grad():
        got = output(pm(**inputs()))
        expected = output(build()(**with_words(inputs(), where)))
        base = output(build()(**inputs()))
        torch.testing.assert_close(output(pm(**inputs(), prefix=None)), base, rtol=0, atol=0)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", TEXT_FAMILIES)
def test_gradients_reach_the_prompt_only(family):
    pm = add_prefix(tiny.FAMILIES[family][0](), PrefixConfig(num_virtual_tokens=3, method="prompt", init_std=0.5))
    tiny.FAMILIES[family][2](pm(**tiny.FAMILIES[family][1]())).float().pow(2).mean().backward()
    assert pm.prefixes["default"].embeddings.grad.abs().sum() > 0
    assert all(p.grad is None for p in pm.base_model.parameters())
    assert pm.get_nb_trainable_parameters()[0] == 3 * prompt_input(pm.base_model).embedding.embedding_dim


@pytest.mark.parametrize("family", ["llama", "gpt2", "opt", "blip2_opt", "blip_caption", "blip_vqa", "t5"])
@pytest.mark.parametrize("settings", [dict(), dict(num_beams=3)], ids=["greedy", "beam"])
def test_generation_equals_the_same_vectors_read_as_tokens(family, settings):
    pm, where = prompted_by_words(family)
    inputs, extra = tiny.GENERATORS[family]
    if family == "blip_caption":
        inputs = lambda: dict(pixel_values=tiny.pixels(), input_ids=tiny.tokens(length=4))  # noqa: E731
    common = dict(max_new_tokens=5, do_sample=False, **extra, **settings)
    with torch.no_grad():
        got = pm.generate(**inputs(), **common)
        uncached = pm.generate(**inputs(), **common, use_cache=False)
        expected = tiny.FAMILIES[family][0]().generate(**with_words(inputs(), where), **common)
        base = tiny.FAMILIES[family][0]().generate(**inputs(), **common)
    assert torch.equal(got, uncached)
    assert torch.equal(got[:, -5:], expected[:, -5:])
    assert got.shape[1] == base.shape[1], "the placeholders are not part of the returned sequences"


@pytest.mark.parametrize("family", ["llama", "gpt2", "opt", "clip", "clip_text", "blip2_opt", "instructblip"])
def test_routed_prompts_of_different_lengths_equal_each_row_alone(family):
    build, inputs, output = tiny.FAMILIES[family]
    pm = add_prefix(build(), PrefixConfig(num_virtual_tokens=3, method="prompt", init_std=1.0), name="a")
    pm.add_prefix("b", PrefixConfig(num_virtual_tokens=1, method="prompt", init_std=1.0))
    for routing in (["a", "b"], [None, "a"]):
        with torch.no_grad():
            mixed = tiny.rows(family, pm(**inputs(), prefix=routing))
            for row, name in enumerate(routing):
                alone = tiny.rows(family, pm(**inputs(), prefix=name))
                if mixed.dim() == 3:  # token outputs: the row's own tokens sit at the end of its columns
                    alone, got = alone[row, -5:], mixed[row, -5:]
                else:
                    alone, got = alone[row], mixed[row]
                torch.testing.assert_close(got, alone, rtol=1e-5, atol=1e-5, msg=f"{routing} row {row}")


@pytest.mark.parametrize("settings", [dict(), dict(num_beams=3)], ids=["greedy", "beam"])
def test_routed_prompt_generation_and_left_padding(settings):
    pm = add_prefix(tiny.llama(), PrefixConfig(num_virtual_tokens=3, method="prompt", init_std=1.0), name="a")
    pm.add_prefix("b", PrefixConfig(num_virtual_tokens=2, method="prompt", init_std=1.0))
    ids = torch.tensor([[0, 0, 5, 6, 7], [8, 9, 10, 11, 12]])
    mask = (ids != 0).long()
    common = dict(max_new_tokens=5, do_sample=False, pad_token_id=0, **settings)
    with torch.no_grad():
        mixed = pm.generate(input_ids=ids, attention_mask=mask, prefix=["b", "a"], **common)
        first = pm.generate(input_ids=ids[:1, 2:], prefix="b", **common)
        second = pm.generate(input_ids=ids[1:], prefix="a", **common)
    assert torch.equal(mixed[0, -5:], first[0, -5:]) and torch.equal(mixed[1, -5:], second[0, -5:])


def test_labels_get_ignored_positions_for_the_prompt():
    pm, where = prompted_by_words("gpt2")
    ids = tiny.tokens()
    with torch.no_grad():
        loss = pm(input_ids=ids, labels=ids).loss
        expected = tiny.gpt2()(**with_words(dict(input_ids=ids, labels=ids), where)).loss
    torch.testing.assert_close(loss, expected)


def test_text_initialisation_uses_the_token_embeddings():
    processor = tiny.TinyProcessor()
    pm = add_prefix(tiny.gpt2(), PrefixConfig(num_virtual_tokens=5, method="prompt", init="text", init_text="one two"),
                    processor=processor)
    ids = processor(text="one two")["input_ids"][0]
    expected = pm.base_model.transformer.wte.weight[ids[torch.arange(5) % 2]]
    torch.testing.assert_close(pm.prefixes["default"].embeddings, expected)


def test_save_load_and_refusals(tmp_path):
    pm, _ = prompted_by_words("blip2_opt")
    pm.save_prefix(tmp_path / "p")
    loaded = load_prefix(tiny.blip2("opt"), tmp_path / "p")
    inputs = tiny.FAMILIES["blip2_opt"][1]
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs()).logits, pm(**inputs()).logits, rtol=0, atol=0)
    with pytest.raises(ValueError, match="embeds text in 64 dimensions"):
        load_prefix(tf.OPTForCausalLM(tf.OPTConfig(vocab_size=100, hidden_size=64, ffn_dim=64, num_hidden_layers=1,
                                                   num_attention_heads=4, word_embed_proj_dim=64)), tmp_path / "p")
    with pytest.raises(ValueError, match="takes no \\['targets'\\]"):
        PrefixConfig(method="prompt", targets=["lm"])
    with pytest.raises(ValueError, match="CLIPVisionModel has none"):
        add_prefix(tiny.clip(tf.CLIPVisionModel), PrefixConfig(method="prompt"))
    with pytest.raises(ValueError, match="needs input_ids"):
        pm(pixel_values=tiny.pixels())
    blip = add_prefix(tiny.blip(), PrefixConfig(num_virtual_tokens=3, method="prompt"), name="a")
    blip.add_prefix("b", PrefixConfig(num_virtual_tokens=2, method="prompt"))
    with pytest.raises(ValueError, match="by index alone"):
        blip(**tiny.FAMILIES["blip_caption"][1](), prefix=["a", "b"])
    blip.add_prefix("kv", PrefixConfig(num_virtual_tokens=2))
    with pytest.raises(ValueError, match="soft prompts and prefixes cannot share a batch"):
        blip(**tiny.FAMILIES["blip_caption"][1](), prefix=["a", "kv"])


def test_using_routes_soft_prompts_for_every_call_inside():
    pm = add_prefix(tiny.gpt2(), PrefixConfig(num_virtual_tokens=3, method="prompt", init_std=1.0), name="a")
    pm.add_prefix("b", PrefixConfig(num_virtual_tokens=2, method="prompt", init_std=1.0))
    ids = tiny.tokens()
    with torch.no_grad():
        with pm.using("b"):
            inside = pm(input_ids=ids).logits
            generated = pm.generate(input_ids=ids, max_new_tokens=3, do_sample=False, pad_token_id=0)
        assert torch.equal(inside, pm(input_ids=ids, prefix="b").logits)
        assert torch.equal(generated, pm.generate(input_ids=ids, max_new_tokens=3, do_sample=False, pad_token_id=0,
                                                  prefix="b"))


def test_clip_text_features_called_on_the_wrapper_carry_the_prompt():
    """Zero-shot classification and retrieval encode texts with get_text_features: the prompt must be there."""
    build, inputs, _ = tiny.FAMILIES["clip"]
    pm, where = prompted_by_words("clip")
    text = {k: v for k, v in inputs().items() if k in ("input_ids", "attention_mask")}

    def features(model, **kwargs):
        out = model.get_text_features(**kwargs)
        return out if torch.is_tensor(out) else out.pooler_output

    with torch.no_grad():
        torch.testing.assert_close(features(pm, **text), features(build(), **with_words(text, where)),
                                   rtol=1e-5, atol=1e-5)
        with pm.using(None):
            torch.testing.assert_close(features(pm, **text), features(build(), **text), rtol=0, atol=0)
