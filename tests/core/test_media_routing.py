"""Per-row routing when towers see images, tiles, frames, crops, packed chunks or audio clips instead of rows.

Each batch of ``tiny_vlms.ROUTING`` (two images beside a text-only row, images of different sizes, an image beside
a video, audio beside an image, ...) runs with one prefix per row; every row must equal that row of the same batch
run with its own prefix for every row (rows of a batch are computed independently; the old "image i belongs to row
i" guess gave row 0's second image row 1's prefix, and fails here), or the call is refused before any compute with
one line that says why. A few cases are also compared with the row run alone, through its own processor call.
"""

from __future__ import annotations

import functools

import pytest
import torch

import tiny_families
import tiny_vlms
from mmprefix import PrefixConfig, add_prefix

CASES = tiny_families.CASES
BATCHES = sorted((name, case) for name, cases in tiny_vlms.ROUTING.items() for case in cases)
ROUTES = (["a", "b"], ["b", None])
# What must be refused, and why: placeholders that cannot tell two images apart (a word between them lets them be
# told apart: the "two_images_apart" batches). Mistral3's vision tower, which no call can route, is left to the
# family matrix (its prefixes here target the language model).
REFUSED = {
    ("llava_next", "two_images"): "runs of their placeholder tokens .* do two images touch",
    ("llava_onevision", "two_images"): "runs of their placeholder tokens .* do two images touch",
    ("llava_next_video", "two_images"): "runs of their placeholder tokens .* do two images touch",
    ("phi4_multimodal", "two_images"): "runs of their placeholder tokens .* do two images touch",
}


@functools.lru_cache(maxsize=None)
def processor(name):
    return CASES[name].processor()


@functools.lru_cache(maxsize=None)
def _batch(name, case) -> dict:
    return tiny_vlms.ROUTING[name][case](processor(name))


def batch(name, case) -> dict:
    return {k: v.clone() if torch.is_tensor(v) else v for k, v in _batch(name, case).items()}


def routed(name):
    """Prefixes "a" (3 slots, every site per-row routing reaches) and "b" (5 slots, each tower's last layer)."""
    targets = CASES[name].routable or CASES[name].targets
    model = add_prefix(CASES[name].build(), PrefixConfig(num_virtual_tokens=3, init_std=1.0, targets=targets), "a")
    model.add_prefix("b", PrefixConfig(num_virtual_tokens=5, init_std=1.0,
                                       targets=[f"{t}[-1:]" for t in (targets or ["*"])]))
    return model


def real(tensor: torch.Tensor, mask: torch.Tensor | None, row: int) -> torch.Tensor:
    """One row's logits at its real (not padding) positions."""
    return tensor[row][mask[row].bool()] if mask is not None else tensor[row]


@pytest.mark.parametrize("route", ROUTES, ids=["a-b", "b-none"])
@pytest.mark.parametrize("name,case", BATCHES, ids=[f"{n}-{c}" for n, c in BATCHES])
def test_each_row_sees_its_own_prefix_in_every_tower_or_the_call_is_refused(name, case, route):
    model = routed(name)
    if (name, case) in REFUSED:
        with pytest.raises(ValueError, match=REFUSED[name, case]) as refused:
            model(**batch(name, case), prefix=route)
        assert "\n" not in str(refused.value)
        return
    mask = _batch(name, case).get("attention_mask")
    with torch.no_grad():
        mixed = model(**batch(name, case), prefix=route).logits
        for row, prefix in enumerate(route):
            alone = model(**batch(name, case), prefix=prefix).logits
            torch.testing.assert_close(real(mixed, mask, row), real(alone, mask, row), rtol=1e-5, atol=1e-5,
                                       msg=f"row {row} ({prefix})")


GENERATED = [(n, c) for n, c in BATCHES if (n, c) not in REFUSED and CASES[n].generation == "decoder"]
# transformers' own beam search fails on these batches (a GLM-4V video: see the test below)
NO_BEAMS = {("glm4v", "video_text"), ("glm4v_moe", "video_text")}


@pytest.mark.parametrize("name,case", sorted(NO_BEAMS))
def test_beam_search_fails_in_the_bare_model_where_generation_below_leaves_it_out(name, case):
    with torch.no_grad(), pytest.raises(ValueError, match="expected a non-empty list of Tensors"):
        CASES[name].build().generate(**batch(name, case), max_new_tokens=2, do_sample=False, num_beams=2)


@pytest.mark.parametrize("name,case", GENERATED, ids=[f"{n}-{c}" for n, c in GENERATED])
def test_generation_keeps_each_rows_prefix_through_the_cache_and_the_beams(name, case):
    """The images run in the first step only (their rows mapped then), later steps reuse the cache; beams
    repeat each row. Every row's tokens and first-step scores equal those of the batch run with its prefix."""
    model = routed(name)
    options = dict(max_new_tokens=3, do_sample=False, return_dict_in_generate=True, output_scores=True,
                   suppress_tokens=tiny_vlms_suppressed(name))
    with torch.no_grad():
        for beams in (1, 2) if CASES[name].beams and (name, case) not in NO_BEAMS else (1,):
            mixed = model.generate(**batch(name, case), **options, num_beams=beams, prefix=["b", "a"])
            for row, prefix in enumerate(["b", "a"]):
                alone = model.generate(**batch(name, case), **options, num_beams=beams, prefix=prefix)
                assert mixed.sequences[row].tolist() == alone.sequences[row].tolist(), f"row {row}, {beams} beams"
                rows = slice(row * beams, (row + 1) * beams)
                torch.testing.assert_close(mixed.scores[0][rows], alone.scores[0][rows], rtol=1e-5, atol=1e-5)


@functools.lru_cache(maxsize=None)
def tiny_vlms_suppressed(name) -> tuple[int, ...]:
    """Special tokens but the end of text: a random model may pick an image placeholder, which would make the next
    step's input a malformed image prompt."""
    tokenizer = getattr(processor(name), "tokenizer", processor(name))
    return tuple(sorted(set(tokenizer.added_tokens_decoder) - {tokenizer.eos_token_id}))


def test_llavas_two_images_beside_a_text_only_row_equal_each_row_run_alone():
    """The issue's case, against each row run through the processor on its own."""
    name, make = "llava", processor("llava")
    model = routed(name)
    pictures = tiny_families.images(2)
    prompts = ["<image> <image> what color is the shape", "describe this image"]
    with torch.no_grad():
        both = dict(make(images=pictures, text=prompts, return_tensors="pt", padding=True))
        mixed = model(**both, prefix=["a", None]).logits
        first = model(**make(images=pictures, text=prompts[:1], return_tensors="pt"), prefix="a").logits[0]
        second = model(**make(text=prompts[1:], return_tensors="pt"), prefix=None).logits[0]
    for row, expected in enumerate((first, second)):
        torch.testing.assert_close(real(mixed, both["attention_mask"], row), expected, rtol=1e-5, atol=1e-5)


def test_a_qwen_image_beside_a_video_equals_each_row_run_alone():
    """One vision tower runs twice (the images, then the videos, packed): each run's chunks go to their rows, also
    when the image and the video take the same number of tokens."""
    name = "qwen2_vl"
    model, make = routed(name), processor(name)
    text = [f"{tiny_vlms.QWEN_IMAGE} what color is the shape", f"{tiny_vlms.QWEN_VIDEO} describe this image"]
    video = dict(videos=[tiny_vlms.frames(2)], videos_kwargs={"size": tiny_vlms.QWEN_VIDEO_SIZE})
    with torch.no_grad():
        both = tiny_vlms.call(make, text, images=tiny_families.images(1), **video)
        assert both["image_grid_thw"].prod().item() == both["video_grid_thw"].prod().item()  # the same size
        mixed = model(**both, prefix=["a", "b"]).logits
        first = model(**tiny_vlms.call(make, text[:1], images=tiny_families.images(1)), prefix="a").logits[0]
        second = model(**tiny_vlms.call(make, text[1:], **video), prefix="b").logits[0]
    for row, expected in enumerate((first, second)):
        torch.testing.assert_close(real(mixed, both["attention_mask"], row), expected, rtol=1e-5, atol=1e-5)


def test_images_whose_placeholders_were_cut_off_are_refused_before_the_model_runs():
    model = routed("llava")
    both = batch("llava", "two_images")
    both = {k: v[:, :-10] if k in ("input_ids", "attention_mask") else v for k, v in both.items()}  # max_length
    calls = []
    model.base_model.register_forward_pre_hook(lambda *args: calls.append(1))
    with pytest.raises(ValueError, match=r"hold \d+ of their placeholder tokens.* cut off by max_length") as refused:
        model(**both, prefix=["a", None])
    assert not calls and "\n" not in str(refused.value)


def test_a_prefix_on_a_tower_the_call_does_not_run_changes_nothing():
    """Text-only rows: the vision prefixes have nothing to see; the language model's are routed as usual."""
    model, make = routed("llava"), processor("llava")
    with torch.no_grad():
        text = dict(make(text=["what color is the shape", "describe this image"], return_tensors="pt", padding=True))
        mixed = model(**text, prefix=["a", None]).logits
        for row, prefix in enumerate(["a", None]):
            alone = model(**text, prefix=prefix).logits
            torch.testing.assert_close(real(mixed, text["attention_mask"], row), real(alone, text["attention_mask"], row))


def test_an_unmapped_input_is_refused_only_where_a_routed_prefix_would_need_it():
    """Qwen2.5-Omni's audio tower: a routed call whose prefixes reach it is refused before any compute when the
    batch has audio, and runs when the batch has none; prefixes that skip it route every batch."""
    name = "qwen2_5_omni"
    everywhere = add_prefix(CASES[name].build(), PrefixConfig(num_virtual_tokens=3, init_std=1.0), "a")
    with pytest.raises(ValueError, match="'audio' tower .* fixed-size chunks"):
        everywhere(**batch(name, "audio_image"), prefix=["a", None])
    with torch.no_grad():
        images = batch(name, "two_images")
        mixed = everywhere(**images, prefix=["a", None]).logits
        for row, prefix in enumerate(["a", None]):
            alone = everywhere(**images, prefix=prefix).logits
            torch.testing.assert_close(real(mixed, images["attention_mask"], row),
                                       real(alone, images["attention_mask"], row), rtol=1e-5, atol=1e-5)


def test_a_using_scope_routes_per_row_only_towers_whose_batch_is_the_rows():
    """Inside ``using([...])`` the calls' images are not known: a tower that sees images item by item refuses, one
    whose batch is the rows by the model's construction (CLIP) routes."""
    llava = routed("llava")
    pixels = batch("llava", "two_images")["pixel_values"]
    with llava.using(["a", None]), pytest.raises(ValueError, match="inside using.. the calls' images are not known"):
        llava.get_image_features(pixel_values=pixels)
    clip = add_prefix(CASES["clip"].build(), PrefixConfig(num_virtual_tokens=3, init_std=1.0), "a")
    pixels = CASES["clip"].inputs(processor("clip"))["pixel_values"]
    def features(prefix):
        with torch.no_grad(), clip.using(prefix):
            out = clip.get_image_features(pixel_values=pixels)
        return out if torch.is_tensor(out) else out.pooler_output

    mixed = features(["a", None])
    for row, prefix in enumerate(["a", None]):
        torch.testing.assert_close(mixed[row], features(prefix)[row])
