"""Where prefixes go: site tables per family, targets, and the `mmprefix sites` command."""

import pytest

import tiny
from mmprefix import PrefixConfig, add_prefix
from mmprefix.cli import main as cli

# family -> {(tower, kind): number of sites}, read off the tiny configs (2 layers everywhere)
EXPECTED = {
    "clip": {("vision", "self"): 2, ("text", "self"): 2},
    "clip_text": {("text", "self"): 2},
    "clip_vision_proj": {("vision", "self"): 2},
    "blip_caption": {("vision", "self"): 2, ("text_decoder", "self"): 2, ("text_decoder", "cross"): 2},
    "blip_vqa": {("vision", "self"): 2, ("text_encoder", "self"): 2, ("text_encoder", "cross"): 2,
                 ("text_decoder", "self"): 2, ("text_decoder", "cross"): 2},
    "blip_retrieval": {("vision", "self"): 2, ("text_encoder", "self"): 2, ("text_encoder", "cross"): 2},
    "blip2_opt": {("vision", "self"): 2, ("qformer", "self"): 2, ("qformer", "cross"): 2, ("lm", "self"): 2},
    "blip2_t5": {("vision", "self"): 2, ("qformer", "self"): 2, ("qformer", "cross"): 2, ("lm_encoder", "self"): 2,
                 ("lm_decoder", "self"): 2, ("lm_decoder", "cross"): 2},
    "instructblip": {("vision", "self"): 2, ("qformer", "self"): 2, ("qformer", "cross"): 2, ("lm", "self"): 2},
    "llama": {("lm", "self"): 2},
    "t5": {("lm_encoder", "self"): 2, ("lm_decoder", "self"): 2, ("lm_decoder", "cross"): 2},
}


@pytest.mark.parametrize("family", sorted(EXPECTED))
def test_every_attention_site_of_each_family_is_found(family):
    pm = add_prefix(tiny.FAMILIES[family][0](), PrefixConfig(num_virtual_tokens=2))
    counts = {}
    for site in pm.sites:
        counts[(site.tower, site.kind)] = counts.get((site.tower, site.kind), 0) + 1
        assert site.layer in (0, 1)
    assert counts == EXPECTED[family]


def test_site_rows_for_blip2_opt():
    pm = add_prefix(tiny.blip2("opt"), PrefixConfig(num_virtual_tokens=2))
    rows = {s.name: (s.tower, s.kind, s.layer, s.heads, s.kv_heads, s.head_dim, s.route) for s in pm.sites}
    assert rows["vision_model.encoder.layers.1.self_attn"] == ("vision", "self", 1, 4, 4, 8, "interface")
    assert rows["qformer.encoder.layer.0.crossattention.attention"] == ("qformer", "cross", 0, 4, 4, 8, "interface")
    assert rows["language_model.model.decoder.layers.1.self_attn"] == ("lm", "self", 1, 4, 4, 8, "interface")


def test_blip_sites_use_the_handwritten_route():
    pm = add_prefix(tiny.blip(), PrefixConfig(num_virtual_tokens=2))
    routes = {(s.tower, s.route) for s in pm.sites}
    assert routes == {("vision", "blip_vision"), ("text_decoder", "blip_text")}


@pytest.mark.parametrize(
    "targets, expected",
    [
        (["vision"], {"vision_model.encoder.layers.0.self_attn", "vision_model.encoder.layers.1.self_attn"}),
        (["qformer.cross"], {"qformer.encoder.layer.0.crossattention.attention",
                             "qformer.encoder.layer.1.crossattention.attention"}),
        (["lm.self[-1:]", "qformer.*[:1]"], {"language_model.model.decoder.layers.1.self_attn",
                                             "qformer.encoder.layer.0.attention.attention",
                                             "qformer.encoder.layer.0.crossattention.attention"}),
        (["*.cross[1:2]"], {"qformer.encoder.layer.1.crossattention.attention"}),
        (["q*.self", "vision[1:]"], {"qformer.encoder.layer.0.attention.attention",
                                     "qformer.encoder.layer.1.attention.attention",
                                     "vision_model.encoder.layers.1.self_attn"}),
    ],
)
def test_targets_select_by_tower_kind_and_layer_range(targets, expected):
    pm = add_prefix(tiny.blip2("opt"), PrefixConfig(num_virtual_tokens=2, targets=targets))
    assert {s.name for s in pm.sites} == expected
    assert pm.get_nb_trainable_parameters()[0] == 2 * 2 * 32 * len(expected)


@pytest.mark.parametrize("targets", [["text_encoder"], ["vision.cros"], ["lm[1]"]])
def test_unknown_targets_list_the_valid_ones(targets):
    with pytest.raises(ValueError, match="lm.self, qformer.cross, qformer.self, vision.self|cannot parse"):
        add_prefix(tiny.blip2("opt"), PrefixConfig(targets=targets))


def test_target_modules_narrow_a_known_family():
    pm = add_prefix(tiny.blip2("opt"), PrefixConfig(num_virtual_tokens=2, target_modules=[r"qformer\..*"]))
    assert {s.tower for s in pm.sites} == {"qformer"}


def test_sites_command_prints_the_table_with_prefix_sizes(tmp_path, capsys):
    tiny.blip2("t5").save_pretrained(tmp_path)
    assert cli(["sites", str(tmp_path), "-p", "10", "--targets", "lm_decoder.cross"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["name", "tower", "kind", "layer", "heads", "kv_heads", "head_dim", "prefix_params"]
    assert out[1].split() == ["language_model.decoder.block.0.layer.1.EncDecAttention", "lm_decoder", "cross", "0", "4",
                              "4", "8", "640"]
    assert out[-2].startswith("2 sites, 1,280 prefix parameters with P=10")
    assert out[-1] == "towers: the tested record of family 'blip-2'"


def test_sites_command_reports_bad_targets_and_missing_models(tmp_path, capsys):
    tiny.gpt2().save_pretrained(tmp_path)
    assert cli(["sites", str(tmp_path), "--targets", "vision"]) == 2
    assert "valid targets for this model: lm.self" in capsys.readouterr().err
    (tmp_path / "notes").mkdir()
    (tmp_path / "odd").mkdir()
    (tmp_path / "odd" / "config.json").write_text('{"hello": 1}')
    for folder, words in [(tmp_path / "missing", "does not exist"), (tmp_path / "notes", "a folder without config.json"),
                          (tmp_path / "odd", "cannot read a model config from")]:
        assert cli(["sites", str(folder)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and words in err, err


def test_sites_command_accepts_what_the_recipes_accept(capsys):
    assert cli(["sites", "embedded:blip", "-p", "2", "--targets", "vision"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert "4 sites, " in "\n".join(line[:9] for line in out)  # the tiny BLIP's 4 vision layers
    assert out[-1] == "towers: the tested record of family 'blip'"
    assert cli(["sites", "embedded:blip:caption", "--targets", "text_decoder.cross"]) == 0
    assert "text_decoder.bert.encoder.layer.0.crossattention.self" in capsys.readouterr().out
    assert cli(["sites", "embedded:nope"]) == 2
    assert "unknown embedded backbone 'nope'" in capsys.readouterr().err


@pytest.mark.parametrize("p", ["0", "-3", "two"])
def test_sites_command_refuses_a_prefix_without_tokens(p, capsys):
    with pytest.raises(SystemExit):
        cli(["sites", "embedded:lm", "-p", p])
    assert "-p/--num-virtual-tokens" in capsys.readouterr().err


def test_sites_command_needs_no_weights(tmp_path, capsys):
    tiny.llama().config.save_pretrained(tmp_path)  # config.json only
    assert cli(["sites", str(tmp_path)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[-2].startswith("2 sites, 1,024 prefix parameters with P=16")
    assert out[-1] == "towers: the tested record of family 'causal LM'"


# -- family records and the generic fallback ----------------------------------------------------------------------
def test_a_refused_tower_is_named_with_its_reason_and_the_rest_still_works():
    import tiny_families

    with pytest.raises(ValueError, match=r"'vision' tower \(Florence2VisionBackbone: its DaViT channel attention .*"
                                         r"targets=\['lm_decoder', 'lm_encoder'\]"):
        add_prefix(tiny_families.florence2(), PrefixConfig())
    pm = add_prefix(tiny_families.florence2(), PrefixConfig(targets=["lm_encoder", "lm_decoder"]))
    assert {s.tower for s in pm.sites} == {"lm_encoder", "lm_decoder"}


def test_a_composite_model_without_a_record_gets_towers_from_its_sub_models(tmp_path, capsys):
    """VipLlava has no record: its towers come from its sub-configs (vision_config -> vision, text_config -> the
    language model's layout); `mmprefix sites` says so. Dropping LLaVA's record gives LLaVA the same towers."""
    import tiny_families
    import transformers as tf
    from mmprefix.core import families
    from mmprefix.core.architectures import tower_layout

    tokenizer = tiny_families.word_tokenizer(image_token="<image>")
    config = tf.VipLlavaConfig(vision_config=dict(tiny_families.VISION, model_type="clip_vision_model"),
                               text_config=tiny_families.lm_config(tokenizer, model_type="llama"),
                               image_token_id=tokenizer.image_token_id, vision_feature_layers=[-2, -1])
    vipllava = tf.VipLlavaForConditionalGeneration(config)
    assert tower_layout(vipllava).fallback
    pm = add_prefix(vipllava, PrefixConfig(num_virtual_tokens=2, targets=["vision", "lm.self[-1:]"]))
    assert {(s.tower, s.kind) for s in pm.sites} == {("vision", "self"), ("lm", "self")}
    vipllava.config.save_pretrained(tmp_path)
    assert cli(["sites", str(tmp_path)]) == 0
    assert "towers: generic fallback" in capsys.readouterr().out

    llava = tiny_families.llava()
    recorded = {(s.name, s.tower, s.kind, s.layer) for s in add_prefix(llava, PrefixConfig()).sites}
    records = {k: v for k, v in families.BY_KEY.items() if k != "llava"}
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("mmprefix.core.architectures.BY_KEY", records)
        generic = add_prefix(tiny_families.llava(), PrefixConfig())
        assert tower_layout(generic.base_model).fallback
    assert {(s.name, s.tower, s.kind, s.layer) for s in generic.sites} == recorded


def test_sites_command_names_the_record_and_what_it_leaves_out(tmp_path, capsys):
    import tiny_families

    tiny_families.llava().config.save_pretrained(tmp_path)
    assert cli(["sites", str(tmp_path)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert "towers: the tested record of family 'llava'" in out
    assert ("left out: vision_tower.encoder.layers.1.self_attn: the model reads the vision tower's hidden "
            "states after layer 0 (vision_feature_layer=-2)") in out  # LlavaModel: the config names no head


def test_the_fallback_leaves_out_what_a_dry_run_shows_the_model_never_reads(tmp_path, capsys):
    """Aya Vision has no record; its SigLIP tower keeps a pooling head whose output the model never reads. A dry run
    of get_image_features on the meta device finds it: left out, and `mmprefix sites` says so and why."""
    import tiny_families

    aya = tiny_families.CASES["aya_vision"].build()
    names = {s.name for s in add_prefix(aya, PrefixConfig(num_virtual_tokens=2)).sites}
    assert "model.vision_tower.head.attention" not in names and "model.vision_tower.encoder.layers.1.self_attn" in names
    aya.config.save_pretrained(tmp_path)
    assert cli(["sites", str(tmp_path)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert "towers: generic fallback (no tested record for this family; towers named after its sub-models)" in out
    assert ("left out: vision_tower.head.attention: the model never reads its output (a dry run of "
            "get_image_features follows no path from it)") in out


def test_fallback_towers_are_named_for_what_they_are_and_never_share_a_name():
    """Built from the sub-config each comes from, however deep: Phi-4-multimodal's vision and audio towers sit in one
    embedding module, Chameleon's language model is its own config's layers (not "layers", not one name twice)."""
    import tiny_families
    from mmprefix.core import families
    from mmprefix.core.architectures import find_sites, tower_layout

    records = {k: v for k, v in families.BY_KEY.items() if k != "phi4_multimodal"}
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("mmprefix.core.architectures.BY_KEY", records)
        phi4 = tiny_families.CASES["phi4_multimodal"].build()
        assert tower_layout(phi4).fallback
        sites = find_sites(phi4)
    roots = {"vision": "model.embed_tokens_extend.image_embed.img_processor.",
             "audio": "model.embed_tokens_extend.audio_embed.encoder.", "lm": "model.layers."}
    assert {s.tower for s in sites} == set(roots)
    assert all(s.name.startswith(roots[s.tower]) for s in sites)
    chameleon = tiny_families.CASES["chameleon"].build()
    assert tower_layout(chameleon).fallback and {s.tower for s in find_sites(chameleon)} == {"lm"}


def test_a_fallback_the_dry_run_cannot_shape_inputs_for_says_it_was_not_checked(tmp_path, capsys):
    import tiny_families
    from mmprefix.core import families

    tiny_families.CASES["glm4v"].build().config.save_pretrained(tmp_path)
    records = {k: v for k, v in families.BY_KEY.items() if k != "glm4v"}
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("mmprefix.core.architectures.BY_KEY", records)
        assert cli(["sites", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "not checked: whether the model reads every vision attention's output (get_image_features did not run" in out
