"""save_prefix / load_prefix: small safetensors + JSON files, atomic writes, clear refusals."""

import json

import pytest
import torch
import transformers as tf

import tiny
from mmprefix import PrefixConfig, add_prefix, load_prefix
from mmprefix.core import saving


def trained(family, **config):
    pm = add_prefix(tiny.FAMILIES[family][0](), PrefixConfig(num_virtual_tokens=4, init_std=0.5, **config))
    return pm


@pytest.mark.parametrize("family", ["blip_vqa", "blip2_t5", "clip", "llama"])
def test_round_trip_reproduces_outputs(family, tmp_path):
    build, inputs, output = tiny.FAMILIES[family]
    pm = trained(family)
    pm.save_prefix(tmp_path / "p")
    assert sorted(p.name for p in (tmp_path / "p").iterdir()) == ["prefix.safetensors", "prefix_config.json"]
    prefix_bytes = sum(p.numel() * 4 for p in pm.prefixes.parameters())
    assert (tmp_path / "p" / "prefix.safetensors").stat().st_size < prefix_bytes + 16_384
    loaded = load_prefix(build(), tmp_path / "p")
    with torch.no_grad():
        torch.testing.assert_close(output(loaded(**inputs())), output(pm(**inputs())), rtol=0, atol=0)
    assert [s.name for s in loaded.sites] == [s.name for s in pm.sites]
    assert all(not p.requires_grad for p in loaded.base_model.parameters())


def test_saved_config_describes_model_and_sites(tmp_path):
    pm = trained("blip_caption", targets=["text_decoder.cross"])
    pm.save_prefix(tmp_path)
    meta = json.loads((tmp_path / "prefix_config.json").read_text())
    assert meta["model"]["architecture"] == "BlipForConditionalGeneration"
    assert meta["prefix_config"]["targets"] == ["text_decoder.cross"]
    assert {s["kind"] for s in meta["sites"]} == {"cross"} and len(meta["sites"]) == 2


def test_targets_survive_the_round_trip(tmp_path):
    pm = trained("blip2_opt", targets=["qformer.cross", "lm.self[-1:]"])
    pm.save_prefix(tmp_path)
    loaded = load_prefix(tiny.blip2("opt"), tmp_path)
    assert [s.name for s in loaded.sites] == [s.name for s in pm.sites]


def test_a_vision_prefix_moves_between_clip_model_and_clip_vision_model(tmp_path):
    pm = trained("clip", targets=["vision"])
    pm.save_prefix(tmp_path)
    vision_model = tiny.clip(tf.CLIPVisionModel)
    vision_model.load_state_dict(pm.base_model.vision_model.state_dict())
    vision = load_prefix(vision_model, tmp_path)
    with torch.no_grad():
        expected = pm.get_image_features(pixel_values=tiny.pixels()).last_hidden_state
        got = vision(pixel_values=tiny.pixels()).last_hidden_state
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def _gpt2(**overrides):
    config = dict(vocab_size=100, n_embd=32, n_layer=2, n_head=4, n_positions=64)
    return tf.GPT2LMHeadModel(tf.GPT2Config(**{**config, **overrides})).eval()


@pytest.mark.parametrize(
    "other, words",
    [
        (dict(n_layer=3), "layers of tower 'lm': the prefix has sites at self 0, self 1, this model at self 0, self 1, "
                          "self 2 (only in the prefix: none; only in this model: self 2)"),
        (dict(n_layer=1), "the prefix has sites at self 0, self 1, this model at self 0 (only in the prefix: self 1; "
                          "only in this model: none)"),
        (dict(n_head=8), "heads differs at transformer.h.0.attn: saved 4, model 8"),
        (dict(n_embd=64, n_head=4), "head_dim differs at transformer.h.0.attn: saved 8, model 16"),
    ],
)
def test_prefix_for_another_geometry_is_refused_with_what_differs(tmp_path, other, words):
    add_prefix(_gpt2(), PrefixConfig(num_virtual_tokens=2)).save_prefix(tmp_path)
    with pytest.raises(ValueError) as err:
        load_prefix(_gpt2(**other), tmp_path)
    assert words in str(err.value) and "saved for GPT2LMHeadModel" in str(err.value)


def test_a_site_at_a_layer_the_model_lacks_is_named(tmp_path):
    """Before: "the prefix has 1 sites in tower 'lm', this model 1", which says nothing of what differs."""
    add_prefix(_gpt2(n_layer=8), PrefixConfig(num_virtual_tokens=2, targets="lm.self[-1:]")).save_prefix(tmp_path)
    with pytest.raises(ValueError, match=r"the prefix has sites at self 7, this model at self 1 \(only in the prefix: "
                                         r"self 7; only in this model: self 1\)"):
        load_prefix(_gpt2(n_layer=2), tmp_path)


def test_prefix_for_another_architecture_is_refused(tmp_path):
    trained("blip_vqa").save_prefix(tmp_path)
    with pytest.raises(ValueError, match=r"saved for BlipForQuestionAnswering.*this model has no 'text_encoder' tower"):
        load_prefix(tiny.clip(), tmp_path)
    with pytest.raises(ValueError, match="saved for BlipForQuestionAnswering.*cannot go on Dinov2Model"):
        load_prefix(tf.Dinov2Model(tf.Dinov2Config(**tiny.VISION)), tmp_path)  # no family record: no towers
    with pytest.raises(ValueError, match="saved for BlipForQuestionAnswering.*this model has no 'text_decoder' tower"):
        load_prefix(tf.ViTModel(tf.ViTConfig(**tiny.VISION)), tmp_path)


def test_pickle_only_folder_is_refused_without_unpickling(tmp_path, monkeypatch):
    torch.save({"x": torch.zeros(1)}, tmp_path / "adapter_model.bin")
    (tmp_path / "adapter_config.json").write_text("{}")

    def no_unpickling(*args, **kwargs):
        raise AssertionError("torch.load must never be called")

    monkeypatch.setattr(torch, "load", no_unpickling)
    with pytest.raises(ValueError, match="only pickle files.*never unpickles"):
        load_prefix(tiny.gpt2(), tmp_path)


def test_missing_or_foreign_folders(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_prefix(tiny.gpt2(), tmp_path / "nowhere")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ValueError, match="not a prefix folder"):
        load_prefix(tiny.gpt2(), tmp_path)


def test_interrupted_save_keeps_the_previous_prefix(tmp_path, monkeypatch):
    pm = trained("gpt2")
    pm.save_prefix(tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with torch.no_grad():
        for p in pm.prefixes.parameters():
            p.add_(1.0)

    def crash(*args, **kwargs):
        raise KeyboardInterrupt("killed mid-save")

    monkeypatch.setattr(saving, "serialize", crash)
    with pytest.raises(KeyboardInterrupt):
        pm.save_prefix(tmp_path)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # no temp files left, old files intact
    load_prefix(tiny.gpt2(), tmp_path)


def test_loading_into_a_prefix_model_adds_a_named_prefix(tmp_path):
    trained("gpt2").save_prefix(tmp_path)
    pm = add_prefix(tiny.gpt2(), PrefixConfig(num_virtual_tokens=2))
    assert load_prefix(pm, tmp_path, name="saved") is pm
    assert set(pm.prefixes) == {"default", "saved"} and pm.active_prefix == "default"
    with pytest.raises(ValueError, match="already exists"):
        pm.load_prefix("saved", tmp_path)


@pytest.mark.parametrize("name", ["half", "train", "training", "to"])
def test_a_name_that_would_shadow_a_module_attribute_is_refused_and_nothing_changes(name):
    # before: ModuleDict's own KeyError "attribute 'half' already exists" after the hooks were installed
    pm = add_prefix(tiny.gpt2(), PrefixConfig(num_virtual_tokens=2))
    with pytest.raises(ValueError, match="cannot name a prefix.*choose another name"):
        pm.add_prefix(name, PrefixConfig(num_virtual_tokens=2))
    assert set(pm.prefixes) == {"default"} and callable(pm.prefixes.train)
