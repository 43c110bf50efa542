"""Readers of every supported format and the image loader's fixes for Pillow's silent mistakes.

Every file is generated in ``tmp_path``; expectations are computed independently (numpy rotations,
``round(v / 257)``, colours painted into the test images) rather than by the code under test.
"""

from __future__ import annotations

import json
import logging
import os

import numpy as np
import pytest
from PIL import Image

from mmprefix.core.images import BadImageError, ImageLoader, load_image, to_rgb
from mmprefix.data.readers import (FORMATS, AnnotationError, read_caption_imagefolder, read_caption_jsonl,
                                   read_coco_captions, read_gqa, read_hf_captions, read_hf_text, read_hf_vqa,
                                   read_karpathy, read_nocaps, read_okvqa, read_samples, read_text_jsonl,
                                   read_vqa_jsonl, read_vqav2)
from mmprefix.data.records import CaptionSample, TextSample, VQASample

datasets = pytest.importorskip("datasets")

RED, GREEN, BLUE, WHITE = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)


# ---------------------------------------------------------------------------------------------------
# helpers


def write_json(path, data):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return path


def write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return path


def close(pixel, expected, tolerance=12):
    return all(abs(int(a) - int(b)) <= tolerance for a, b in zip(pixel, expected))


def noise_jpeg(path, size=(64, 48)):
    pixels = np.random.default_rng(0).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, "JPEG", quality=95)
    return path


# ---------------------------------------------------------------------------------------------------
# images: the Pillow edge cases of environment.md


def test_exif_rotated_jpeg_comes_out_upright(tmp_path):
    stored = np.zeros((20, 40, 3), np.uint8)  # 40 wide, 20 high: left half red, right half blue
    stored[:, :20] = RED
    stored[:, 20:] = BLUE
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation 6: display rotated 90 degrees clockwise
    path = tmp_path / "rotated.jpg"
    Image.fromarray(stored).save(path, "JPEG", quality=95, exif=exif)

    image = load_image(path)
    expected = np.rot90(stored, k=-1)  # clockwise, computed independently of Pillow
    assert image.mode == "RGB" and image.size == (20, 40)
    got = np.asarray(image).astype(int)
    assert np.abs(got - expected.astype(int)).mean() < 8
    assert close(image.getpixel((10, 5)), RED) and close(image.getpixel((10, 35)), BLUE)  # top red, bottom blue


def test_rgba_transparent_area_is_white_and_half_alpha_blends(tmp_path):
    rgba = np.zeros((8, 8, 4), np.uint8)  # left half fully transparent (black), right half opaque green
    rgba[:, 4:] = (*GREEN, 255)
    rgba[0, 0] = (0, 0, 0, 128)  # half-transparent black over white: mid grey
    path = tmp_path / "alpha.png"
    Image.fromarray(rgba, "RGBA").save(path)

    assert Image.open(path).convert("RGB").getpixel((1, 1)) == (0, 0, 0)  # what Pillow alone does
    image = load_image(path)
    assert image.mode == "RGB"
    assert image.getpixel((1, 1)) == WHITE and image.getpixel((6, 6)) == GREEN
    assert close(image.getpixel((0, 0)), (127, 127, 127), 2)


def test_la_and_palette_transparency_are_white(tmp_path):
    la = Image.merge("LA", (Image.new("L", (4, 4), 0), Image.new("L", (4, 4), 0)))
    la.save(tmp_path / "la.png")
    assert load_image(tmp_path / "la.png").getpixel((0, 0)) == WHITE

    palette = Image.new("P", (4, 4), 0)
    palette.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    palette.putpixel((3, 3), 1)
    palette.save(tmp_path / "p.png", transparency=0)  # index 0 (black) is transparent
    image = load_image(tmp_path / "p.png")
    assert image.getpixel((0, 0)) == WHITE and image.getpixel((3, 3)) == RED

    palette.save(tmp_path / "p_bytes.png", transparency=bytes([0, 255]))  # tRNS as bytes
    with_bytes = load_image(tmp_path / "p_bytes.png")
    assert with_bytes.getpixel((0, 0)) == WHITE and with_bytes.getpixel((3, 3)) == RED


@pytest.mark.parametrize("mode", ["I;16", "I"])
def test_sixteen_bit_grey_ramp_is_scaled_not_clipped(tmp_path, mode):
    ramp = np.linspace(0, 65535, 512).round().astype(np.uint16).reshape(2, 256)
    source = Image.fromarray(ramp) if mode == "I;16" else Image.fromarray(ramp.astype(np.int32))
    assert source.mode == mode
    path = tmp_path / ("ramp.png" if mode == "I;16" else "ramp.tif")
    source.save(path)
    assert Image.open(path).mode == mode
    assert (np.asarray(Image.open(path).convert("RGB"))[..., 0] == 255).mean() > 0.9  # Pillow clips

    image = load_image(path)
    values = np.asarray(image)[..., 0].ravel().astype(int)
    assert image.mode == "RGB"
    assert values[0] == 0 and values[-1] == 255
    assert np.all(np.diff(values) >= 0)  # monotonic
    np.testing.assert_array_equal(values, np.round(ramp.ravel() / 257).astype(int))


def test_cmyk_jpeg_and_other_modes_become_rgb(tmp_path):
    cmyk = Image.new("CMYK", (8, 8), (255, 0, 0, 0))  # full cyan ink
    cmyk.save(tmp_path / "cmyk.jpg", "JPEG", quality=95)
    image = load_image(tmp_path / "cmyk.jpg")
    assert image.mode == "RGB" and close(image.getpixel((4, 4)), (0, 255, 255))

    assert load_image(Image.new("1", (2, 2), 1)).getpixel((0, 0)) == WHITE
    assert load_image(Image.new("L", (2, 2), 7)).getpixel((0, 0)) == (7, 7, 7)
    assert load_image(Image.new("YCbCr", (2, 2), (255, 128, 128))).mode == "RGB"


def test_animated_gif_gives_first_frame(tmp_path):
    frames = [Image.new("RGB", (6, 6), RED), Image.new("RGB", (6, 6), BLUE)]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=50, loop=0)
    assert close(load_image(path).getpixel((2, 2)), RED, 4)
    with Image.open(path) as opened:
        assert opened.n_frames == 2
        opened.seek(1)  # an image object left on a later frame still gives the first
        assert close(load_image(opened).getpixel((2, 2)), RED, 4)


def test_in_memory_images_are_fixed_too_and_result_outlives_the_file(tmp_path):
    rgba = Image.new("RGBA", (3, 3), (0, 0, 0, 0))
    assert load_image(rgba).getpixel((1, 1)) == WHITE
    rgb = Image.new("RGB", (3, 3), RED)
    assert load_image(rgb) is not rgb  # a copy; the caller's image is untouched
    path = tmp_path / "x.png"
    Image.new("RGB", (3, 3), GREEN).save(path)
    image = load_image(path)
    path.unlink()
    assert image.getpixel((0, 0)) == GREEN


def _bad_files(tmp_path):
    full = noise_jpeg(tmp_path / "full.jpg").read_bytes()
    (tmp_path / "truncated.jpg").write_bytes(full[: len(full) // 2])
    (tmp_path / "header_only.jpg").write_bytes(full[:40])
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "garbage.png").write_bytes(b"this is not an image at all" * 10)
    (tmp_path / "folder.jpg").mkdir()
    return {
        "truncated.jpg": "",
        "header_only.jpg": "",
        "empty.jpg": "empty file",
        "garbage.png": "",
        "missing.jpg": "file not found",
        "folder.jpg": "directory",
    }


def test_truncated_jpeg_opens_in_pillow_then_fails_on_load(tmp_path):
    _bad_files(tmp_path)
    with Image.open(tmp_path / "truncated.jpg") as image:  # the trap: open succeeds
        with pytest.raises(OSError):
            image.load()


def test_bad_files_raise_bad_image_error_naming_path_and_reason(tmp_path):
    for name, reason in _bad_files(tmp_path).items():
        path = tmp_path / name
        with pytest.raises(BadImageError) as caught:
            load_image(path)
        error = caught.value
        assert not isinstance(error, OSError) and isinstance(error, ValueError)
        assert error.path == str(path) and str(path) in str(error)
        assert reason in error.reason and error.reason


def test_bad_files_are_skipped_and_counted(tmp_path, caplog):
    bad = _bad_files(tmp_path)
    good = noise_jpeg(tmp_path / "good.jpg")
    loader = ImageLoader(on_bad_image="skip")
    with caplog.at_level(logging.WARNING, logger="mmprefix.core.images"):
        results = [loader.load(tmp_path / name) for name in bad] + [loader(good)]
    assert results[:-1] == [None] * len(bad) and results[-1].mode == "RGB"
    assert loader.num_skipped == len(bad)
    assert [entry.path for entry in loader.skipped] == [str(tmp_path / name) for name in bad]
    assert str(tmp_path / "truncated.jpg") in caplog.text
    assert load_image(tmp_path / "truncated.jpg", on_bad_image="skip") is None

    strict = ImageLoader()
    with pytest.raises(BadImageError, match="truncated.jpg"):
        strict.load(tmp_path / "truncated.jpg")
    with pytest.raises(ValueError, match="on_bad_image"):
        load_image(good, on_bad_image="ignore")
    with pytest.raises(ValueError, match="on_bad_image"):
        ImageLoader(on_bad_image="warn")


def test_to_rgb_is_public_for_decoded_images():
    assert to_rgb(Image.new("LA", (2, 2), (0, 0))).getpixel((0, 0)) == WHITE


# ---------------------------------------------------------------------------------------------------
# VQA readers


def vqav2_files(root, with_annotations=True, data_subtype="val2014"):
    questions = {"data_subtype": data_subtype, "questions": [
        {"image_id": 42, "question": "What colour is the bus?", "question_id": 420},
        {"image_id": 7, "question": "How many dogs?", "question_id": 70},
    ]}
    answers = ["red"] * 6 + ["maroon"] * 3 + ["red"]
    annotations = {"annotations": [
        {"question_id": 70, "image_id": 7, "answers": [{"answer": "2", "answer_confidence": "yes", "answer_id": i}
                                                        for i in range(1, 11)],
         "multiple_choice_answer": "2", "answer_type": "number", "question_type": "how many"},
        {"question_id": 420, "image_id": 42, "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": i}
                                                          for i, a in enumerate(answers, 1)],
         "multiple_choice_answer": "red", "answer_type": "other", "question_type": "what color is the"},
        {"question_id": 999, "image_id": 1, "answers": []},  # extra annotation: ignored
    ]}
    q = write_json(root / "Questions" / "v2_OpenEnded_mscoco_val2014_questions.json", questions)
    a = None
    if with_annotations:
        a = write_json(root / "Annotations" / "v2_mscoco_val2014_annotations.json", annotations)
    return q, a


def test_vqav2_pairs_questions_and_all_ten_answers(tmp_path):
    q, a = vqav2_files(tmp_path)
    images = tmp_path / "Images" / "val2014"
    images.mkdir(parents=True)
    samples = read_vqav2(q, a, image_root=images)
    assert [s.question_id for s in samples] == [420, 70]
    first = samples[0]
    assert isinstance(first, VQASample)
    assert first.image == str(images / "COCO_val2014_000000000042.jpg")
    assert first.answers == ["red"] * 6 + ["maroon"] * 3 + ["red"]  # order and duplicates kept
    assert (first.image_id, first.answer_type, first.question_type) == (42, "other", "what color is the")
    assert samples[1].answers == ["2"] * 10


def test_vqav2_test_split_without_annotations_and_defaults(tmp_path, monkeypatch):
    q, _ = vqav2_files(tmp_path, with_annotations=False, data_subtype="test2015")
    monkeypatch.chdir(tmp_path / "Questions")
    samples = read_vqav2(os.path.basename(q))  # relative file name, image_root = its folder
    assert [s.answers for s in samples] == [[], []]
    assert samples[0].image == str(tmp_path / "Questions" / "COCO_test2015_000000000042.jpg")
    custom = read_vqav2(q, split="val2014", image_pattern="{split}/{image_id}.png")
    assert custom[1].image == str(tmp_path / "Questions" / "val2014" / "7.png")


def test_vqav2_errors_name_the_file_and_record(tmp_path):
    q, a = vqav2_files(tmp_path)
    data = json.loads(a.read_text())
    data["annotations"][1]["answers"][3] = {"answer": 5}
    write_json(a, data)
    with pytest.raises(AnnotationError) as caught:
        read_vqav2(q, a)
    assert str(a) in str(caught.value) and "annotations[1].answers[3]" in str(caught.value)
    assert "'answer' must be a string" in str(caught.value)

    data["annotations"] = data["annotations"][1:]
    data["annotations"][0]["answers"][3] = {"answer": "red"}
    write_json(a, data)
    with pytest.raises(AnnotationError, match=r"questions\[1\].*question_id 70 has no annotation"):
        read_vqav2(q, a)

    questions = json.loads(q.read_text())
    del questions["questions"][1]["question"]
    del questions["data_subtype"]
    write_json(q, questions)
    with pytest.raises(AnnotationError, match=r"v2_OpenEnded_mscoco_val2014_questions.json: questions\[1\]: "
                                              r"missing key 'question'"):
        read_vqav2(q, split="val2014")
    with pytest.raises(ValueError, match="split="):
        read_vqav2(q)  # no data_subtype, and the pattern needs {split}

    mismatch = write_json(tmp_path / "ann2.json", {"annotations": [
        {"question_id": 420, "image_id": 43, "answers": []}]})
    one = write_json(tmp_path / "q1.json", {"questions": [{"image_id": 42, "question": "?", "question_id": 420}]})
    with pytest.raises(AnnotationError, match=r"annotations\[0\].*differs"):
        read_vqav2(one, mismatch, split="val2014")
    with pytest.raises(AnnotationError, match="top level.*'questions'"):
        read_vqav2(mismatch)


def test_missing_files_and_image_folder(tmp_path):
    q, a = vqav2_files(tmp_path)
    with pytest.raises(FileNotFoundError, match="nope.json"):
        read_vqav2(tmp_path / "nope.json")
    with pytest.raises(FileNotFoundError, match="image folder not found.*no_images"):
        read_vqav2(q, a, image_root=tmp_path / "no_images")


def test_invalid_json_file_reports_line(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('{"questions": [\n  {"image_id": 1,}\n]}')
    with pytest.raises(AnnotationError, match=r"broken.json: line 2, column \d+: invalid JSON"):
        read_vqav2(path)


def test_okvqa_answer_fields(tmp_path):
    write_json(tmp_path / "OpenEnded_mscoco_val2014_questions.json", {"data_subtype": "val2014", "questions": [
        {"image_id": 9, "question": "What sport can you use this for?", "question_id": 90}]})
    raw = ["racing", "racing", "motocross", "motocross", "riding", "riding", "race", "race", "bike", "bike"]
    stemmed = ["race", "race", "motocross", "motocross", "ride", "ride", "race", "race", "bike", "bike"]
    write_json(tmp_path / "mscoco_val2014_annotations.json", {"annotations": [
        {"image_id": 9, "question_id": 90, "answer_type": "other", "question_type": "four", "confidence": 2,
         "answers": [{"answer_id": i + 1, "raw_answer": r, "answer_confidence": "yes", "answer": s}
                     for i, (r, s) in enumerate(zip(raw, stemmed))]}]})
    q, a = tmp_path / "OpenEnded_mscoco_val2014_questions.json", tmp_path / "mscoco_val2014_annotations.json"
    (sample,) = read_okvqa(q, a)
    assert sample.answers == stemmed and sample.question_type == "four"
    assert read_okvqa(q, a, answer_field="raw_answer")[0].answers == raw
    assert sample.image.endswith("COCO_val2014_000000000009.jpg")


def test_gqa_single_answer_and_string_ids(tmp_path):
    path = write_json(tmp_path / "questions1.2" / "testdev_balanced_questions.json", {
        "201307251": {"imageId": "n161313", "question": "Is it overcast?", "answer": "no", "fullAnswer": "No, clear.",
                      "types": {"structural": "verify", "semantic": "attr", "detailed": "weatherVerify"}},
        "201640614": {"imageId": "n235859", "question": "Who is wearing the dress?", "isBalanced": True},
    })
    images = tmp_path / "images"
    images.mkdir()
    first, second = read_gqa(path, image_root=images)
    assert (first.question_id, first.image_id, first.answers) == ("201307251", "n161313", ["no"])
    assert (first.answer_type, first.question_type) == ("verify", "weatherVerify")
    assert first.image == str(images / "n161313.jpg")
    assert second.answers == [] and second.answer_type is None

    write_json(path, {"5": {"imageId": "n1", "question": 3}})
    with pytest.raises(AnnotationError, match=r"testdev_balanced_questions.json: \['5'\]: 'question' must be a string"):
        read_gqa(path)


def test_vqa_jsonl_relative_to_its_folder_not_cwd(tmp_path, monkeypatch):
    path = write_jsonl(tmp_path / "data" / "vqa.jsonl", [
        {"image": "img/a.jpg", "question": "What?", "answers": ["x", "y"]},
        "",
        {"image": str(tmp_path / "abs.jpg"), "question": "Where?", "answer": "here", "question_id": "q2"},
        {"image": "b.jpg", "question": "Who?"},
    ])
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    a, b, c = read_vqa_jsonl(path)
    assert a.image == str(tmp_path / "data" / "img" / "a.jpg") and a.answers == ["x", "y"] and a.question_id == 0
    assert b.image == str(tmp_path / "abs.jpg") and b.answers == ["here"] and b.question_id == "q2"
    assert c.answers == [] and c.question_id == 2
    root = tmp_path / "root"
    root.mkdir()
    assert read_vqa_jsonl(path, image_root=root)[0].image == str(root / "img" / "a.jpg")


@pytest.mark.parametrize("line, reason", [
    ('{"image": "a.jpg", "question": "ok"', "invalid JSON"),
    ('{"image": "a.jpg"}', "missing key 'question'"),
    ('{"image": "a.jpg", "question": "q", "answers": "yes"}', "'answers' must be a list of strings"),
    ('["image", "question"]', "expected a JSON object"),
    ('{"image": 5, "question": "q"}', "'image' must be a string"),
])
def test_jsonl_malformed_line_names_file_and_line(tmp_path, line, reason):
    path = write_jsonl(tmp_path / "vqa.jsonl", [{"image": "a.jpg", "question": "fine"}, "", line])
    with pytest.raises(AnnotationError) as caught:
        read_vqa_jsonl(path)
    assert str(caught.value).startswith(f"{path}: line 3: ") and reason in str(caught.value)
    assert caught.value.where == "line 3" and caught.value.path == str(path)


def test_non_utf8_line_is_an_annotation_error(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b'{"prompt": "ok"}\n{"prompt": "caf\xe9"}\n')
    with pytest.raises(AnnotationError, match="latin1.jsonl: line 2: not UTF-8"):
        read_text_jsonl(path)


def test_first_missing_image_is_logged(tmp_path, caplog):
    path = write_jsonl(tmp_path / "vqa.jsonl", [{"image": "nowhere.jpg", "question": "?"}])
    with caplog.at_level(logging.WARNING, logger="mmprefix.data.readers"):
        read_vqa_jsonl(path)
    assert "nowhere.jpg" in caplog.text and "does not exist" in caplog.text


# ---------------------------------------------------------------------------------------------------
# captioning readers


def coco_file(path, with_annotations=True):
    data = {"images": [{"id": 1, "file_name": "one.jpg", "domain": "in-domain"},
                       {"id": 2, "file_name": "two.jpg", "domain": "out-domain"},
                       {"id": 3, "file_name": "sub/three.jpg", "domain": "near-domain"}]}
    if with_annotations:
        data["annotations"] = [{"image_id": 2, "id": 10, "caption": "A dog runs. \n"},
                               {"image_id": 1, "id": 11, "caption": "A cat."},
                               {"image_id": 2, "id": 12, "caption": " Another dog."}]
    return write_json(path, data)


def test_coco_captions_grouped_in_image_order(tmp_path):
    path = coco_file(tmp_path / "annotations" / "captions_val2014.json")
    one, two, three = read_coco_captions(path)
    assert isinstance(one, CaptionSample)
    assert (one.image_id, one.captions) == (1, ["A cat."])
    assert two.captions == ["A dog runs.", "Another dog."]  # stripped, file order
    assert three.captions == [] and three.image == str(tmp_path / "annotations" / "sub" / "three.jpg")

    data = json.loads(path.read_text())
    data["annotations"].append({"image_id": 99, "caption": "ghost"})
    write_json(path, data)
    with pytest.raises(AnnotationError, match=r"captions_val2014.json: annotations\[3\]: image_id 99 is not in"):
        read_coco_captions(path)


def test_nocaps_test_info_and_domain(tmp_path):
    test_info = coco_file(tmp_path / "nocaps_test_image_info.json", with_annotations=False)
    assert [s.captions for s in read_nocaps(test_info)] == [[], [], []]
    val = coco_file(tmp_path / "nocaps_val_4500_captions.json")
    (out,) = read_nocaps(val, domain="out-domain")
    assert out.image_id == 2 and len(out.captions) == 2


def karpathy_file(path):
    def image(i, split, filepath=True):
        record = {"filename": f"img{i}.jpg", "imgid": i, "split": split,
                  "sentences": [{"raw": f"caption {i} a ", "tokens": ["caption"]}, {"raw": f"caption {i} b"}]}
        if filepath:
            record.update(filepath="val2014", cocoid=1000 + i)
        return record
    return image


def test_karpathy_coco_and_flickr(tmp_path):
    image = karpathy_file(None)
    coco = write_json(tmp_path / "dataset_coco.json", {"dataset": "coco", "images": [
        image(0, "train"), image(1, "restval"), image(2, "test"), image(3, "val")]})
    root = tmp_path / "coco"
    root.mkdir()
    (test,) = read_karpathy(coco, image_root=root)
    assert test.image_id == 1002 and test.image == str(root / "val2014" / "img2.jpg")
    assert test.captions == ["caption 2 a", "caption 2 b"]
    assert [s.image_id for s in read_karpathy(coco, split=("train", "restval"))] == [1000, 1001]
    assert len(read_karpathy(coco, split=None)) == 4
    with pytest.raises(ValueError, match=r"no images in split 'dev'.*\['restval', 'test', 'train', 'val'\]"):
        read_karpathy(coco, split="dev")

    flickr = write_json(tmp_path / "dataset_flickr30k.json", {"dataset": "flickr30k", "images": [
        image(5, "test", filepath=False)]})
    (sample,) = read_karpathy(flickr)
    assert sample.image_id == 5 and sample.image == str(tmp_path / "img5.jpg")

    write_json(flickr, {"images": [{"filename": "x.jpg", "imgid": 1, "split": "test", "sentences": [{"tokens": []}]}]})
    with pytest.raises(AnnotationError, match=r"images\[0\].sentences\[0\]: missing key 'raw'"):
        read_karpathy(flickr)


def test_caption_jsonl(tmp_path):
    path = write_jsonl(tmp_path / "caps.jsonl", [
        {"image": "a.jpg", "captions": ["one", "two "]},
        {"image": "b.jpg", "caption": "three", "image_id": 7},
        {"image": "c.jpg"},
    ])
    a, b, c = read_caption_jsonl(path)
    assert (a.image_id, a.captions, a.image) == ("a.jpg", ["one", "two"], str(tmp_path / "a.jpg"))
    assert (b.image_id, b.captions) == (7, ["three"])
    assert c.captions == []
    write_jsonl(path, [{"image": "a.jpg", "captions": ["ok", 3]}])
    with pytest.raises(AnnotationError, match="line 1: 'captions' must be a list of strings"):
        read_caption_jsonl(path)


def test_caption_imagefolder(tmp_path):
    folder = tmp_path / "folder"
    write_jsonl(folder / "metadata.jsonl", [{"file_name": "a.png", "text": "a red square"},
                                            {"file_name": "sub/b.png", "captions": ["x", "y"]}])
    write_jsonl(folder / "validation" / "metadata.jsonl", [{"file_name": "c.png", "text": "c"}])
    Image.new("RGB", (2, 2), RED).save(folder / "a.png")
    a, b = read_caption_imagefolder(folder)
    assert (a.image_id, a.captions, a.image) == ("a.png", ["a red square"], str(folder / "a.png"))
    assert b.captions == ["x", "y"] and b.image == str(folder / "sub" / "b.png")
    assert load_image(a.image).getpixel((0, 0)) == RED
    (c,) = read_caption_imagefolder(folder, split="validation")
    assert c.image == str(folder / "validation" / "c.png")
    with pytest.raises(FileNotFoundError, match="no metadata.jsonl"):
        read_caption_imagefolder(tmp_path)
    with pytest.raises(FileNotFoundError, match="image folder not found"):
        read_caption_imagefolder(tmp_path / "absent")


# ---------------------------------------------------------------------------------------------------
# text reader


def test_text_jsonl(tmp_path):
    path = write_jsonl(tmp_path / "text.jsonl", [{"prompt": "2+2=", "target": "4"}, {"prompt": "hi", "id": "x"}])
    first, second = read_text_jsonl(path)
    assert first == TextSample(id=0, prompt="2+2=", target="4")
    assert second == TextSample(id="x", prompt="hi", target="")
    write_jsonl(path, [{"prompt": "a", "target": "b"}, {"target": "b"}])
    with pytest.raises(AnnotationError, match=r"text.jsonl: line 2: missing key 'prompt'"):
        read_text_jsonl(path)


# ---------------------------------------------------------------------------------------------------
# Hugging Face datasets


def test_hf_vqa_with_column_mapping_and_embedded_images():
    rows = [{"q": "What colour?", "img": Image.new("RGBA", (4, 4), (0, 0, 0, 0)), "qid": 5,
             "answers": [{"answer": "white", "answer_confidence": "yes", "answer_id": 1}] * 2},
            {"q": "Why?", "img": Image.new("RGB", (4, 4), RED), "qid": 6, "answers": []}]
    dataset = datasets.Dataset.from_list(rows)
    first, second = read_hf_vqa(dataset, columns={"question": "q", "image": "img", "question_id": "qid"})
    assert (first.question_id, first.question, first.answers) == (5, "What colour?", ["white", "white"])
    assert isinstance(first.image, Image.Image)  # lazily opened from the stored bytes
    assert load_image(first.image).getpixel((0, 0)) == WHITE and load_image(second.image).getpixel((0, 0)) == RED
    assert first.image.fp is not None  # still lazy: loading did not keep decoded pixels in the sample
    assert load_image(first.image).getpixel((0, 0)) == WHITE

    streamed = read_hf_vqa(dataset.to_iterable_dataset(), columns={"question": "q", "image": "img"})
    assert [s.question for s in streamed] == ["What colour?", "Why?"] and streamed[1].question_id == 1

    with pytest.raises(ValueError, match=r"column 'nope' \(for 'question'\) not in"):
        read_hf_vqa(dataset, columns={"question": "nope"})
    with pytest.raises(ValueError, match=r"no column for \['image', 'question'\]"):
        read_hf_vqa(datasets.Dataset.from_list([{"x": 1}]))


def test_hf_vqa_paths_answer_column_and_dataset_dict(tmp_path):
    Image.new("RGB", (2, 2), GREEN).save(tmp_path / "g.png")
    with_paths = datasets.Dataset.from_list([{"image": "g.png", "question": "?", "answer": "green"}])
    (sample,) = read_hf_vqa(with_paths, image_root=tmp_path)
    assert sample.image == str(tmp_path / "g.png") and sample.answers == ["green"] and sample.question_id == 0

    cast = datasets.Dataset.from_list([{"image": str(tmp_path / "g.png"), "question": "?"}])
    cast = cast.cast_column("image", datasets.Image())
    splits = datasets.DatasetDict({"train": cast, "validation": cast})
    (from_dict,) = read_hf_vqa(splits, split="validation")
    assert from_dict.image == str(tmp_path / "g.png")  # a file on disk stays a path (no bytes held)
    with pytest.raises(ValueError, match=r"split=.*\['train', 'validation'\]"):
        read_hf_vqa(splits)

    bad = datasets.Dataset.from_list([{"image": "g.png", "question": 3}])
    with pytest.raises(AnnotationError, match="row 0: 'question' must be a string"):
        read_hf_vqa(bad)

    corrupt = datasets.Dataset.from_dict({"image": [{"bytes": b"garbage", "path": None}], "question": ["?"]},
                                         features=datasets.Features({"image": datasets.Image(),
                                                                     "question": datasets.Value("string")}))
    (undecodable,) = read_hf_vqa(corrupt)  # reading never decodes: the skip policy decides when it is loaded
    assert load_image(undecodable.image, on_bad_image="skip") is None
    with pytest.raises(BadImageError, match="row 0: UnidentifiedImageError"):
        load_image(undecodable.image)
    loader = ImageLoader(on_bad_image="skip")
    assert loader(undecodable.image) is None and loader.skipped[0].path.endswith("row 0")


def test_hf_by_name_with_load_dataset_args(tmp_path):
    data = write_jsonl(tmp_path / "hf" / "train.jsonl", [{"prompt": "p", "completion": "c"}])
    samples = read_hf_text("json", data_files=str(data), split="train", cache_dir=str(tmp_path / "cache"),
                           columns={"target": "completion"})
    assert samples == [TextSample(id=0, prompt="p", target="c")]


def test_hf_captions_and_text_objects():
    captions = datasets.Dataset.from_list([
        {"image": Image.new("RGB", (2, 2), BLUE), "sentences": [{"raw": " a b "}, {"raw": "c"}], "id": 3},
    ])
    (sample,) = read_hf_captions(captions, columns={"captions": "sentences", "image_id": "id"})
    assert sample.captions == ["a b", "c"] and sample.image_id == 3
    plain = datasets.Dataset.from_list([{"image": Image.new("RGB", (2, 2)), "caption": "one"}])
    assert read_hf_captions(plain)[0].captions == ["one"]
    text = datasets.Dataset.from_list([{"prompt": "a", "target": "b"}])
    assert read_hf_text(text) == [TextSample(id=0, prompt="a", target="b")]


# ---------------------------------------------------------------------------------------------------
# read_samples


def test_read_samples_detects_formats(tmp_path):
    q, a = vqav2_files(tmp_path)
    assert [s.answers[0] for s in read_samples("vqa", q, annotations=a)] == ["red", "2"]
    gqa = write_json(tmp_path / "gqa.json", {"1": {"imageId": "n1", "question": "?", "answer": "yes"}})
    assert read_samples("vqa", gqa)[0].answers == ["yes"]
    vqa_jsonl = write_jsonl(tmp_path / "v.jsonl", [{"image": "a.jpg", "question": "?"}])
    assert read_samples("vqa", vqa_jsonl)[0].question == "?"

    coco = coco_file(tmp_path / "coco.json")
    assert len(read_samples("caption", coco)) == 3
    karpathy = write_json(tmp_path / "dataset_coco.json", {"images": [karpathy_file(None)(0, "test")]})
    assert read_samples("caption", karpathy, split="test")[0].image_id == 1000
    folder = tmp_path / "folder"
    write_jsonl(folder / "metadata.jsonl", [{"file_name": "a.png", "text": "t"}])
    assert read_samples("caption", folder)[0].captions == ["t"]
    text = write_jsonl(tmp_path / "t.jsonl", [{"prompt": "p"}])
    assert read_samples("text", text)[0].prompt == "p"
    dataset = datasets.Dataset.from_list([{"prompt": "x"}])
    assert read_samples("text", dataset)[0].prompt == "x"
    assert read_samples("caption", coco, format="nocaps", domain="in-domain")[0].image_id == 1


def test_read_samples_errors_list_formats(tmp_path):
    unknown = write_json(tmp_path / "odd.json", {"something": []})
    with pytest.raises(ValueError, match=r"cannot tell the format.*\['vqav2', 'okvqa', 'gqa', 'jsonl', 'hf'\]"):
        read_samples("vqa", unknown)
    with pytest.raises(ValueError, match="unknown format 'csv'.*'coco'"):
        read_samples("caption", unknown, format="csv")
    with pytest.raises(ValueError, match="unknown task"):
        read_samples("detection", unknown)
    with pytest.raises(FileNotFoundError, match="format='hf'"):
        read_samples("vqa", "some-org/some-dataset")
    with pytest.raises(ValueError, match="cannot tell the format of folder"):
        read_samples("vqa", tmp_path)
    assert set(FORMATS) == {"vqa", "caption", "text"}


# ---------------------------------------------------------------------------------------------------
# ids, pairs of files, and datasets whose images are all unreadable


def test_a_repeated_vqav2_question_id_is_an_error_naming_both_places(tmp_path):
    q, a = vqav2_files(tmp_path)
    questions = json.loads(q.read_text())
    questions["questions"][1]["question_id"] = 420  # would silently get question 420's answers
    write_json(q, questions)
    with pytest.raises(AnnotationError, match=r"questions\[1\]: question_id 420 repeats the one at questions\[0\]"):
        read_vqav2(q, a)
    q, a = vqav2_files(tmp_path)
    annotations = json.loads(a.read_text())
    annotations["annotations"][2]["question_id"] = 70
    write_json(a, annotations)
    with pytest.raises(AnnotationError, match=r"annotations\[2\]: question_id 70 repeats the one at annotations\[0\]"):
        read_vqav2(q, a)


def test_questions_and_annotations_of_different_splits_are_an_error(tmp_path):
    q, a = vqav2_files(tmp_path)
    annotations = json.loads(a.read_text())
    write_json(a, {**annotations, "data_subtype": "train2014"})
    with pytest.raises(AnnotationError, match="data_subtype 'train2014' differs from the questions' 'val2014'"):
        read_vqav2(q, a)
    for record in annotations["annotations"]:
        record["question_id"] += 1000
    write_json(a, annotations)
    with pytest.raises(AnnotationError, match="none of the 2 questions of .* has an annotation here"):
        read_vqav2(q, a)


@pytest.mark.parametrize("reader, rows, words", [
    (read_vqa_jsonl, [{"image": "a.jpg", "question": "?", "question_id": 3}, {"image": "b.jpg", "question": "!",
                                                                             "id": 3}],
     "line 2: question_id 3 repeats the one at line 1"),
    (read_caption_jsonl, [{"image": "a.jpg", "caption": "x"}, {"image": "b.jpg"}, {"image": "a.jpg", "caption": "y"}],
     "line 3: image id 'a.jpg' repeats the one at line 1"),
    (read_text_jsonl, [{"prompt": "p", "id": "x"}, {"prompt": "q", "id": "x"}], "line 2: id 'x' repeats"),
])
def test_repeated_ids_in_jsonl_are_errors(reader, rows, words, tmp_path):
    with pytest.raises(AnnotationError, match=words):
        reader(write_jsonl(tmp_path / "data.jsonl", rows))


def test_repeated_ids_in_karpathy_and_datasets_are_errors(tmp_path):
    images = [{"filename": f"{n}.jpg", "cocoid": 5, "split": "test", "sentences": [{"raw": "a"}]} for n in "ab"]
    with pytest.raises(AnnotationError, match=r"images\[1\]: image id 5 repeats the one at images\[0\]"):
        read_karpathy(write_json(tmp_path / "k.json", {"images": images}))
    rows = datasets.Dataset.from_list([{"image": "a.jpg", "question": "?", "question_id": 1}] * 2)
    with pytest.raises(AnnotationError, match="row 1: question_id 1 repeats the one at row 0"):
        read_hf_vqa(rows)
    with pytest.raises(AnnotationError, match="row 1: id 7 repeats"):
        read_hf_text(datasets.Dataset.from_list([{"prompt": "p", "id": 7}] * 2))


def test_training_rows_with_unreadable_images_are_replaced_and_counted_once(tmp_path):
    from mmprefix.experiment.recipe import SampleDataset

    good = [tmp_path / f"{n}.png" for n in range(3)]
    for n, path in enumerate(good):
        Image.new("RGB", (4, 4), (n * 80, 0, 0)).save(path)
    (tmp_path / "broken.png").write_bytes(b"not an image")
    paths = [good[0], tmp_path / "missing.png", tmp_path / "broken.png", good[1], good[2]]
    samples = [VQASample(question_id=i, image=str(p), question="?", answers=["a"]) for i, p in enumerate(paths)]
    dataset = SampleDataset(samples, on_bad_image="skip")
    rows = [dataset[i] for i in range(len(dataset))] + [dataset[1]]  # the bad rows drawn twice
    assert [s.question_id for s, _ in rows] == [0, 3, 3, 3, 4, 3], "a bad row is replaced by the next good one"
    assert all(image.size == (4, 4) for _, image in rows)
    assert dataset.summary() == (f"2 of 5 training images could not be read and were skipped (e.g. "
                                 f"{tmp_path / 'missing.png'}, {tmp_path / 'broken.png'})")
    assert SampleDataset(samples[:1], on_bad_image="skip").summary() is None
    with pytest.raises(BadImageError, match="missing.png"):
        SampleDataset(samples)[1]  # the default policy: an error


def test_unreadable_images_found_by_dataloader_workers_are_counted(tmp_path):
    import torch

    from mmprefix.experiment.recipe import SampleDataset

    Image.new("RGB", (4, 4), RED).save(tmp_path / "good.png")
    paths = ["good.png", "gone-1.png", "good.png", "gone-2.png", "good.png", "gone-3.png"]
    samples = [VQASample(question_id=i, image=str(tmp_path / p), question="?", answers=["a"]) for i, p in enumerate(paths)]
    dataset = SampleDataset(samples, on_bad_image="skip")
    loader = torch.utils.data.DataLoader(dataset, batch_size=2, num_workers=2, collate_fn=lambda rows: rows)
    assert sum(len(batch) for batch in loader) == 6  # full batches: every bad row was replaced in a worker
    assert dataset.summary().startswith("3 of 6 training images could not be read")


def test_a_dataset_whose_every_image_is_unreadable_is_a_clear_error(tmp_path):
    from mmprefix.data import NoReadableImages
    from mmprefix.experiment.recipe import SampleDataset

    (tmp_path / "broken.png").write_bytes(b"\x89PNG garbage")
    samples = [VQASample(question_id=i, image=str(tmp_path / name), question="?", answers=["a"])
               for i, name in enumerate(["gone.png", "broken.png", "gone2.png"])]
    with pytest.raises(NoReadableImages, match=r"none of the 3 images could be read \(e.g. .*gone2?.png: "):
        SampleDataset(samples, on_bad_image="skip")[0]
