"""Image-conditioned prefixes (``condition="image"``): each row equals a plain prefix whose keys and values are
shifted by hand by the meta-network's output for that row's image (the frozen vision tower's pooled features);
routing, generation, CLIP classification, saving, and the errors."""

import pytest
import torch
from torch.nn import functional as F

import tiny
from mmprefix import PrefixConfig, add_prefix, load_prefix
from mmprefix.evaluation.contrastive import classification_logits, classify
from mmprefix.training import TrainingError, train

from train_tiny import tiny_config


def conditioned(build=tiny.blip, p=3, **extra):
    """An image-conditioned prefix whose meta-network is random (its last layer starts at zero)."""
    pm = add_prefix(build(), PrefixConfig(num_virtual_tokens=p, condition="image", condition_hidden=8,
                                          init_std=1.0, **extra))
    with torch.no_grad():
        for parameter in pm.prefixes["default"].condition.parameters():
            parameter.normal_(std=0.5)
    return pm


def features(model, pixels):
    """The frozen vision tower's pooled features, by hand (no prefix anywhere)."""
    with torch.no_grad():
        return model.vision_model(pixel_values=pixels).pooler_output


def shifted_copy(pm, build, pixels, row):
    """A plain prefix (no meta-network) whose keys and values are the conditioned ones shifted for ``row``'s image:
    the meta-network applied by hand to the hand-computed features."""
    store = pm.prefixes["default"]
    net = store.condition.net
    vision_sites = [s.name for s in store.sites if s.tower == "vision"]
    fresh = build()
    out = net[2](F.relu(net[0](features(fresh, pixels[row : row + 1]))))[0]
    plain = add_prefix(fresh, PrefixConfig(num_virtual_tokens=store.num_virtual_tokens, init_std=1.0))
    start, kv = 0, {}
    with torch.no_grad():
        for site in store.sites:
            keys, values = (t.clone() for t in store.kv(site.name))
            if site.name not in vision_sites:
                size = site.kv_heads * site.head_dim
                keys += out[start : start + size].view(site.kv_heads, 1, site.head_dim)
                values += out[start + size : start + 2 * size].view(site.kv_heads, 1, site.head_dim)
                start += 2 * size
            kv[site.name] = (keys, values)
        plain.prefixes["default"].set_kv(kv)
    return plain


def test_a_new_meta_network_leaves_the_prefix_unconditioned_bit_for_bit():
    plain = add_prefix(tiny.blip(), PrefixConfig(num_virtual_tokens=3, init_std=1.0))
    torch.manual_seed(0)
    cond = add_prefix(tiny.blip(), PrefixConfig(num_virtual_tokens=3, condition="image", init_std=1.0))
    plain.prefixes["default"].set_kv({site.name: cond.prefixes["default"].kv(site.name) for site in plain.sites})
    batch = tiny.FAMILIES["blip_caption"][1]()
    with torch.no_grad():
        torch.testing.assert_close(cond(**batch).logits, plain(**batch).logits, rtol=0, atol=0)


@pytest.mark.parametrize("method", ["prefix", "memory"])
def test_each_row_equals_the_prefix_shifted_by_hand_for_its_own_image(method):
    pm = conditioned(method=method)
    if method == "memory":
        with torch.no_grad():
            for value in pm.prefixes["default"].values.values():
                value.normal_()
    batch = tiny.FAMILIES["blip_caption"][1]()
    with torch.no_grad():
        got = pm(**batch).logits
        for row in range(2):
            plain = shifted_copy(pm, tiny.blip, batch["pixel_values"], row)
            if method == "memory":  # the same shifts, read as a memory
                plain.prefixes["default"].config.method = "memory"
            expected = plain(**{k: v[row : row + 1] for k, v in batch.items()}).logits[0]
            torch.testing.assert_close(got[row], expected, rtol=1e-5, atol=1e-5)


def test_conditioned_plain_and_no_prefix_rows_share_a_batch_and_beams_keep_each_rows_image():
    pm = conditioned()
    pm.add_prefix("plain", PrefixConfig(num_virtual_tokens=2, init_std=1.0))
    batch = dict(input_ids=tiny.tokens(3), pixel_values=tiny.pixels(3))
    routing = ["default", "plain", None]
    with torch.no_grad():
        mixed = pm(**batch, prefix=routing).logits
        for row, name in enumerate(routing):
            alone = pm(**{k: v[row : row + 1] for k, v in batch.items()}, prefix=name).logits[0]
            torch.testing.assert_close(mixed[row], alone, rtol=1e-5, atol=1e-5)
        pixels = tiny.pixels(2)
        beams = pm.generate(pixel_values=pixels, num_beams=3, max_new_tokens=4, do_sample=False)
        for row in range(2):
            plain = shifted_copy(pm, tiny.blip, pixels, row)
            alone = plain.generate(pixel_values=pixels[row : row + 1], num_beams=3, max_new_tokens=4, do_sample=False)
            assert beams[row].tolist() == alone[0].tolist()


def test_the_vision_towers_own_prefix_is_not_conditioned():
    pm = conditioned()
    pm.add_prefix("same", PrefixConfig(num_virtual_tokens=3, init_std=1.0, targets=["vision"]))
    store = pm.prefixes["default"]
    vision = [s.name for s in store.sites if s.tower == "vision"]
    pm.prefixes["same"].set_kv({site.name: store.kv(site.name) for site in pm.prefixes["same"].sites})
    with torch.no_grad():
        pixels = tiny.pixels()
        model = pm.base_model
        ours = model.vision_model(pixel_values=pixels).last_hidden_state  # the active, conditioned prefix
        with pm.using("same"):
            theirs = model.vision_model(pixel_values=pixels).last_hidden_state
    assert vision and store.condition.slices.keys().isdisjoint(vision)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


def test_a_call_without_images_and_a_prefix_without_a_text_side_are_refused():
    pm = conditioned()
    with pytest.raises(ValueError, match="conditioned on images .* passes none: give it the images, or run it inside"):
        pm(input_ids=tiny.tokens())
    with pytest.raises(ValueError, match="needs a target outside the vision tower"):
        add_prefix(tiny.blip(), PrefixConfig(condition="image", targets=["vision"]))
    with pytest.raises(ValueError, match="has no vision tower"):
        add_prefix(tiny.gpt2(), PrefixConfig(condition="image"))
    with pytest.raises(ValueError, match="not a soft prompt"):
        PrefixConfig(method="prompt", condition="image")


@pytest.mark.parametrize("family", ["llava", "qwen2_vl", "idefics3"])
def test_models_whose_images_are_not_one_per_row_are_refused(family):
    """Only a record that pairs image i with text row i (media layout ROWS) proves which image a row reads; LLaVA's
    item lists (a row may hold none or two), Qwen-VL's packed grid and Idefics' padded groups are refused."""
    import tiny_families

    with pytest.raises(ValueError, match="need one image per row"):
        add_prefix(tiny_families.CASES[family].build(), PrefixConfig(condition="image"))


def test_save_load_and_a_vision_tower_of_another_width_is_refused(tmp_path):
    pm = conditioned(targets=["text_decoder"])
    pm.save_prefix(tmp_path)
    batch = tiny.FAMILIES["blip_caption"][1]()
    with torch.no_grad():
        torch.testing.assert_close(load_prefix(tiny.blip(), tmp_path)(**batch).logits, pm(**batch).logits, rtol=0, atol=0)
    import transformers as tf

    config = tiny.blip_config()
    config.vision_config.hidden_size = 48  # the text tower's cross-attention keeps its geometry
    config.vision_config.intermediate_size = 96
    with pytest.raises(ValueError, match="reads image features of width 32, this model's vision tower gives 48"):
        load_prefix(tf.BlipForConditionalGeneration(config), tmp_path)


def test_clip_classification_gives_each_image_its_own_class_embeddings():
    """The training logits and zero-shot classification against CLIP run image by image inside conditioned_on."""
    pm = conditioned(tiny.clip)
    ids = tiny.tokens(3, length=5)
    batch = {"pixel_values": tiny.pixels(2), "input_ids": ids, "attention_mask": torch.ones_like(ids),
             "num_templates": 1}
    with torch.no_grad():
        logits = classification_logits(pm, batch)
        scale = pm.base_model.logit_scale.exp()
        for row in range(2):
            pixels = batch["pixel_values"][row : row + 1]
            image = F.normalize(pm.get_image_features(pixel_values=pixels).pooler_output, dim=-1)
            with pm.conditioned_on(pixels):
                text = F.normalize(pm.get_text_features(input_ids=ids).pooler_output, dim=-1)
            torch.testing.assert_close(logits[row], scale * (image @ text.T)[0], rtol=1e-5, atol=1e-5)
    assert logits.shape == (2, 3)


def test_zero_shot_classification_with_a_conditioned_clip_prefix(tmp_path):
    from PIL import Image

    pm = conditioned(tiny.clip)
    images = [Image.new("RGB", (32, 32), color) for color in ((200, 10, 10), (10, 10, 200), (10, 200, 10))]
    samples = [(image, name) for image, name in zip(images, ["red", "blue", "green"])]
    processor = tiny.TinyProcessor()

    class Clip:  # the zero-shot path pads texts to one batch: TinyProcessor takes one text at a time
        tokenizer = None

        def __call__(self, text=None, images=None, return_tensors="pt", padding=False):
            if text is not None:
                rows = [processor(text=t)["input_ids"][0] for t in text]
                ids = torch.nn.utils.rnn.pad_sequence(rows, batch_first=True)
                return {"input_ids": ids, "attention_mask": (ids != 0).long()}
            return {"pixel_values": torch.cat([processor(images=i)["pixel_values"] for i in images])}

    scores = classify(pm, Clip(), samples, ["red", "blue", "green"], ["a {} photo"], batch_size=6)
    assert set(scores) == {"top1", "top5"}


def test_nan_from_the_meta_network_stops_training_before_any_update(tmp_path):
    """Features that make the meta-network's output NaN make the loss NaN: the NaN guard stops the step."""
    pm = conditioned()
    with torch.no_grad():
        pm.prefixes["default"].condition.net[0].bias.fill_(float("nan"))
    before = {n: p.detach().clone() for n, p in pm.prefixes.named_parameters()}

    class Rows(torch.utils.data.Dataset):
        def __len__(self):
            return 8

        def __getitem__(self, index):
            return index

    def collate(rows):
        ids = tiny.tokens(len(rows))
        return {"input_ids": ids, "pixel_values": tiny.pixels(len(rows)), "labels": ids}

    with pytest.raises(TrainingError, match="loss became"):
        train(pm, Rows(), collate, tiny_config(str(tmp_path / "run"), 2))
    for name, parameter in pm.prefixes.named_parameters():
        torch.testing.assert_close(parameter, before[name], equal_nan=True)


def test_gradient_checkpointing_gives_the_same_gradients():
    """The meta-networks run when the call starts, outside the checkpointed layers, so the layers recomputed in
    backward read the same shifts (computed inside the first layer, a recomputation would record other tensors)."""
    def gradients(checkpointing):
        pm = tiny.without_dropout(conditioned())
        if checkpointing:
            pm.gradient_checkpointing_enable()
        pm.train()
        batch = tiny.FAMILIES["blip_caption"][1]()
        pm(**batch, labels=batch["input_ids"], prefix=["default", None]).loss.backward()
        return {n: p.grad for n, p in pm.prefixes.named_parameters()}

    plain, checkpointed = gradients(False), gradients(True)
    assert plain["default.condition.net.2.weight"].abs().sum() > 0
    for name, grad in checkpointed.items():
        torch.testing.assert_close(grad, plain[name], rtol=1e-6, atol=1e-7)


def test_open_clip_text_reads_each_images_shift_in_forward_and_inside_conditioned_on():
    """open_clip: forward(image, text) conditions each image's texts; a text-only call of the wrapped model's own
    encode_text inside conditioned_on gives the same features."""
    pm = conditioned(tiny.open_clip_model)
    images, text = tiny.pixels(2), tiny.open_clip_text(1)
    with torch.no_grad():
        out = pm(image=images, text=text.repeat(2, 1))
        features = out["text_features"] if isinstance(out, dict) else out[1]
        alone = []
        for row in range(2):
            with pm.conditioned_on(images[row : row + 1]):
                alone.append(pm.encode_text(text, normalize=True)[0])
    torch.testing.assert_close(features, torch.stack(alone), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(alone[0], alone[1], atol=1e-4), "each image must shift its text differently"
