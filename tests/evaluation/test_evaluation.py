"""The evaluation harness: predictions, resumption, bad images, official formats and scores, several runs by
prefix routing, reports, CLIP-like classification and retrieval, and the eval/evaluate.py command, on tiny random
models built offline."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers as tf
from PIL import Image
from torch.nn import functional as F

import tiny
from mmprefix import PrefixConfig, add_prefix, evaluation, load_prefix
from mmprefix.data import formatting
from mmprefix.data.classification import read_classification
from mmprefix.evaluation import decode, metrics, report
from mmprefix.models import loading
from mmprefix.data import BadImageError, CaptionSample, NoReadableImages, TextSample, VQASample
from mmprefix.embedded import text

ROOT = Path(__file__).resolve().parents[2]
QUESTIONS = ["what color is the circle?", "how many shapes are there?", "is there a red square?",
             "what shape is the blue object?", "what size is the red circle?"]
SETTINGS = dict(generation={"max_new_tokens": 3}, progress=False)



from mmprefix.experiment import evaluate as cli  # the harness, as `mmprefix eval` runs it


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from a second thread, and lose 50x when another process keeps the cores busy."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    paths = []
    for i in range(5):
        path = folder / f"{i}.png"
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(path)
        paths.append(str(path))
    (folder / "bad.jpg").write_bytes(b"not an image")
    return paths


def vqa_samples(images):
    return [VQASample(question_id=i, image=images[i], question=q, answers=["blue"] * 6 + ["red"] * 4,
                      answer_type="other", question_type=q.split()[0]) for i, q in enumerate(QUESTIONS)]


def counting(model):
    """Count the model's generate calls (decode.* call model.generate)."""
    calls = []
    original = model.generate

    def generate(*args, **kwargs):
        calls.append(kwargs.get("pixel_values", kwargs.get("input_ids")).shape[0])
        return original(*args, **kwargs)

    model.generate = generate
    return calls


# -- predict ---------------------------------------------------------------------------------------------------


def test_predictions_are_keyed_by_id_and_equal_the_task_functions(images):
    samples = vqa_samples(images)
    model, processor = tiny.world_blip(), tiny.world_blip_processor()
    predictions, errors = evaluation.predict("vqa", model, processor, samples, batch_size=2, **SETTINGS)
    assert list(predictions) == [0, 1, 2, 3, 4] and errors == []
    pictures = [Image.open(p).convert("RGB") for p in images]
    expected = [decode.answer_questions(model, processor, [p], [q], max_new_tokens=3)[0] for p, q in zip(pictures, QUESTIONS)]
    assert list(predictions.values()) == expected
    assert len(set(expected)) > 1  # the tiny model's answers depend on the input
    # BLIP-VQA batches hold questions of one length: transformers' BLIP decoder would read the padding
    assert evaluation.predict("vqa", model, processor, samples, batch_size=5, **SETTINGS)[0] == predictions

    captioner = tiny.world_blip(tf.BlipForConditionalGeneration)
    captions, _ = evaluation.predict("caption", captioner, processor,
                                     [CaptionSample(image_id=f"img{i}", image=p) for i, p in enumerate(images)],
                                     batch_size=3, **SETTINGS)
    assert list(captions.values()) == decode.caption_images(captioner, processor, pictures, max_new_tokens=3)
    assert list(captions) == [f"img{i}" for i in range(5)]
    own = captioner.generate(pixel_values=processor(images=pictures, return_tensors="pt")["pixel_values"],
                             max_new_tokens=3, num_beams=1, do_sample=False)  # BLIP's own default start
    assert decode.caption_images(captioner, processor, pictures, max_new_tokens=3) == \
        [processor.tokenizer.decode(row, skip_special_tokens=True) for row in own]

    lm, tokenizer = tiny.world_llama(), text.lm_tokenizer()
    prompts = ["red | circle | small ->", "blue | square | large ->", "green | triangle ->"]
    texts = [TextSample(id=f"t{i}", prompt=p, target="the circle is red") for i, p in enumerate(prompts)]
    continuations, _ = evaluation.predict("text", lm, tokenizer, texts, batch_size=2, **SETTINGS)
    assert list(continuations.values()) == decode.complete_texts(lm, tokenizer, prompts, max_new_tokens=3)

    blip2 = tiny.world_blip2()
    from mmprefix.embedded import blip2_processor

    answers, _ = evaluation.predict("vqa", blip2, blip2_processor(), vqa_samples(images)[:2], **SETTINGS)
    assert answers == dict(zip([0, 1], decode.answer_questions(blip2, blip2_processor(), pictures[:2], QUESTIONS[:2],
                                                              max_new_tokens=3)))
    with pytest.raises(ValueError, match="deterministic"):
        evaluation.predict("vqa", model, processor, samples, generation={"do_sample": True})
    with pytest.raises(TypeError, match="VQASample"):
        evaluation.predict("vqa", model, processor, texts)


def test_a_killed_run_resumes_without_recomputing(images, tmp_path):
    samples = vqa_samples(images)
    model, processor = tiny.world_blip(), tiny.world_blip_processor()
    path = tmp_path / "predictions.jsonl"
    full, _ = evaluation.predict("vqa", model, processor, samples, batch_size=2, **SETTINGS)

    original = model.generate
    calls = []

    def dies_on_second_batch(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # the process is killed while the second batch runs
        return original(*args, **kwargs)

    model.generate = dies_on_second_batch
    with pytest.raises(KeyboardInterrupt):
        evaluation.predict("vqa", model, processor, samples, batch_size=2, predictions_path=path, **SETTINGS)
    written = [json.loads(line)["id"] for line in path.read_text().splitlines()[1:]]
    assert 1 <= len(written) <= 2  # the first batch was written before the kill
    with open(path, "a") as handle:
        handle.write('{"id": 4, "predic')  # a write cut off by the kill

    model.generate = original
    calls = counting(model)
    resumed, _ = evaluation.predict("vqa", model, processor, samples, batch_size=2, predictions_path=path, **SETTINGS)
    assert sum(calls) == 5 - len(written)  # only the questions not on disk
    assert resumed == full
    ids = [json.loads(line).get("id") for line in path.read_text().splitlines()[1:]]
    assert sorted(ids) == [0, 1, 2, 3, 4] and ids[: len(written)] == written

    calls.clear()
    again, _ = evaluation.predict("vqa", model, processor, samples, batch_size=2, predictions_path=path, **SETTINGS)
    assert calls == [] and again == full
    with pytest.raises(ValueError, match="made with"):  # other decoding settings never mix into the file
        evaluation.predict("vqa", model, processor, samples, predictions_path=path, generation={"num_beams": 2},
                           progress=False)


def test_bad_images_are_reported_not_fatal(images, tmp_path):
    samples = vqa_samples(images)[:2]
    samples.insert(1, VQASample(question_id=7, image=str(Path(images[0]).parent / "bad.jpg"), question="what?",
                                answers=["no"] * 10))
    samples.append(VQASample(question_id=8, image=str(tmp_path / "missing.png"), question="what?", answers=["no"] * 10))
    model, processor = tiny.world_blip(), tiny.world_blip_processor()
    predictions, errors = evaluation.predict("vqa", model, processor, samples, batch_size=2, **SETTINGS)
    assert list(predictions) == [0, 1]
    assert [(e["id"], Path(e["image"]).name) for e in errors] == [(7, "bad.jpg"), (8, "missing.png")]
    assert "file not found" in errors[1]["reason"] and errors[0]["reason"]
    with pytest.raises(BadImageError):
        evaluation.predict("vqa", model, processor, samples, on_bad_image="error", **SETTINGS)

    results = evaluation.evaluate_runs("vqa", model, processor, samples, {"base": None}, tmp_path / "out", **SETTINGS)
    assert len(results["base"]["errors"]) == 2 and set(results["base"]["predictions"]) == {0, 1}

    unreadable = [s for s in samples if s.question_id in (7, 8)]  # skipping all of them would score nothing
    with pytest.raises(NoReadableImages, match="none of the 2 images could be read"):
        evaluation.predict("vqa", model, processor, unreadable, **SETTINGS)


# -- scores and formats ----------------------------------------------------------------------------------------


def test_vqa_scores_are_the_official_metrics():
    samples = [
        VQASample(1, None, "how many?", ["2"] * 3 + ["3"] * 7, answer_type="number", question_type="how many"),
        VQASample(2, None, "is it?", ["yes"] * 10, answer_type="yes/no", question_type="is the"),
        VQASample(3, None, "what color?", ["red"] * 2 + ["blue"] * 8, answer_type="other", question_type="what color"),
        VQASample(4, None, "which?", ["left"], question_type="gqa"),  # GQA: one answer
        VQASample(5, None, "which?", ["a cat"]),
        VQASample(6, None, "unannotated?", []),  # test split: not scored
    ]
    predictions = {1: "two", 2: "yes", 3: "red", 4: "Left.", 5: "dog", 6: "x"}
    scores = evaluation.score("vqa", predictions, samples)
    annotations = {s.question_id: {"answers": s.answers, "answer_type": s.answer_type, "question_type": s.question_type}
                   for s in samples[:3]}
    official = metrics.vqa_corpus_accuracy(predictions, annotations)
    assert scores["vqa_accuracy"] == official["overall"] == round(100 * (0.9 + 1 + 0.6) / 3, 2)
    assert {k: scores[f"vqa_accuracy/{k}"] for k in ("number", "yes/no", "other")} == official["perAnswerType"]
    assert scores["vqa_accuracy_by_question/how many"] == official["perQuestionType"]["how many"]
    assert scores["exact_match"] == 50.0  # "Left." == "left", "dog" != "a cat"
    only_gqa = evaluation.score("vqa", predictions, samples[3:5])
    assert only_gqa == {"exact_match": 50.0}  # official VQA accuracy of a single answer is always 0: not reported
    assert report.primary_metric("vqa", {"r": {"metrics": only_gqa}}) == "exact_match"


@pytest.mark.slow  # seconds of subprocesses or a JVM: the slow suite (CI runs it too)
def test_text_and_caption_scores_and_official_formats():
    texts = [TextSample("a", "p", "the circle is red"), TextSample("b", "p", "the square is blue")]
    predictions = {"a": "The circle is red.", "b": "the square is green"}
    scores = evaluation.score("text", predictions, texts)
    assert scores == {**metrics.bleu(list(predictions.values()), [t.target for t in texts]), "exact_match": 50.0}

    captions = [CaptionSample(1, None, ["a red circle", "a circle that is red"]),
                CaptionSample(2, None, ["two blue squares", "blue squares"]),
                CaptionSample(3, None, ["a green triangle on the left"])]
    generated = {1: "a red circle", 2: "a blue square", 3: "a triangle"}
    direct = metrics.caption_metrics(generated, {c.image_id: c.captions for c in captions}, spice=True)
    assert "SPICE" in direct["unavailable"]  # offline: SPICE cannot run, and nothing else breaks
    full = evaluation.score("caption", generated, captions, spice=True)
    assert full == {k: v for k, v in direct.items() if k != "unavailable"}
    fast = evaluation.score("caption", generated, captions, meteor=False)
    assert fast == {k: v for k, v in direct.items() if k not in ("METEOR", "unavailable")}

    assert evaluation.official_results("vqa", {5: "yes"}) == [{"question_id": 5, "answer": "yes"}]
    assert evaluation.official_results("caption", generated)[0] == {"image_id": 1, "caption": "a red circle"}
    assert evaluation.official_results("text", predictions)[1] == {"id": "b", "text": "the square is green"}


# -- several runs ----------------------------------------------------------------------------------------------


def test_runs_route_prefixes_and_the_base_run_is_the_unwrapped_model(images, tmp_path):
    samples = vqa_samples(images)
    processor = tiny.world_blip_processor()
    unwrapped, _ = evaluation.predict("vqa", tiny.world_blip(), processor, samples, **SETTINGS)
    model = add_prefix(tiny.world_blip(), PrefixConfig(num_virtual_tokens=4, init_std=0.5), name="a")
    model.add_prefix("b", PrefixConfig(num_virtual_tokens=4, init_std=0.5))
    results = evaluation.evaluate_runs("vqa", model, processor, samples, {"base": None, "A": "a", "B": "b"},
                                       tmp_path, batch_size=2, **SETTINGS)
    assert list(results) == ["base", "A", "B"]
    assert results["base"]["predictions"] == unwrapped
    for name in ("a", "b"):  # each run equals its prefix alone on a fresh model, no routing involved
        model.save_prefix(tmp_path / f"saved-{name}", name=name)
        alone = load_prefix(tiny.world_blip(), tmp_path / f"saved-{name}")
        assert results[name.upper()]["predictions"] == evaluation.predict("vqa", alone, processor, samples, **SETTINGS)[0]
    a, b = results["A"]["predictions"], results["B"]["predictions"]
    assert a != b and a != unwrapped and b != unwrapped
    assert model.active_prefix == "a"  # routing per run leaves the model's own choice alone
    for label, run in results.items():
        assert run["metrics"] == evaluation.score("vqa", run["predictions"], samples)
        official = json.loads((tmp_path / label / "results.json").read_text())
        assert official == evaluation.official_results("vqa", run["predictions"])
        assert (tmp_path / label / "predictions.jsonl").is_file()
    with pytest.raises(ValueError, match="unknown prefix"):
        evaluation.predict("vqa", model, processor, samples, prefix="nope", **SETTINGS)
    with pytest.raises(ValueError, match="PrefixModel"):
        evaluation.predict("vqa", tiny.world_blip(), processor, samples, prefix="a", **SETTINGS)


def test_report_files(images, tmp_path):
    samples = vqa_samples(images)
    samples[0].question = "is <b>this</b> & that?"
    samples.append(VQASample(question_id=9, image=str(tmp_path / "gone.png"), question="q", answers=["x"] * 10))
    results = {
        "zero-shot": {"metrics": {"vqa_accuracy/other": 10.0, "vqa_accuracy": 12.5,
                                  "vqa_accuracy_by_question/what": 20.0},
                      "predictions": {0: "<script>alert(1)</script>", 1: "blue"}, "errors": [], "num_samples": 6},
        "prefix|1": {"metrics": {"vqa_accuracy": 50.0, "vqa_accuracy/other": 40.0},
                     "predictions": {0: "red", 9: "x"}, "num_samples": 6,
                     "errors": [{"id": 9, "image": "gone.png", "reason": "file not found"}]},
    }
    paths = report.write_report(tmp_path, "vqa", samples, results, examples=4, settings={"num_beams": 1})
    page = paths["html"].read_text()
    assert "<script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "is &lt;b&gt;this&lt;/b&gt; &amp; that?" in page
    assert page.count("data:image/jpeg;base64,") == 3  # 4 examples spread over 6 samples; the last image is gone
    assert "image unreadable" in page and "blue ×6" in page
    table = paths["markdown"].read_text()
    lines = report.markdown_table(results, "vqa").splitlines()
    assert lines[0] == "| run | vqa_accuracy | vqa_accuracy/other | samples | errors |"
    assert lines[2] == "| zero-shot | 12.50 | 10.00 | 6 | 0 |" and lines[3] == "| prefix\\|1 | 50.00 | 40.00 | 6 | 1 |"
    assert "\n".join(lines) in table and "| what | 20.00 | – |" in table
    summary = json.loads(paths["json"].read_text())
    assert summary["primary_metric"] == "vqa_accuracy" and summary["settings"] == {"num_beams": 1}
    assert summary["runs"]["prefix|1"]["num_errors"] == 1 and summary["runs"]["zero-shot"]["metrics"]["vqa_accuracy"] == 12.5

    texts = [TextSample("a", "red | circle ->", "the circle is red"), TextSample("b", "x <y>", "")]
    runs = {"lm": {"metrics": {"exact_match": 50.0, "Bleu_4": 0.25}, "predictions": {"a": "The circle is red."},
                   "errors": [], "num_samples": 2}}
    page = report.write_report(tmp_path / "text", "text", texts, runs)["html"].read_text()
    assert '<span class="hit">The circle is red.</span>' in page and "x &lt;y&gt;" in page and "base64" not in page
    assert report.markdown_table(runs, "text").splitlines()[2] == "| lm | 0.2500 | 50.00 | 2 | 0 |"  # primary first


def test_the_report_says_what_was_run_and_shows_every_question_type(images, tmp_path):
    """The page names model, method and run, embeds the curves, has the per-question-type table, and its examples
    cover every question type (the one that got worse too); captioning has no empty input column."""
    kinds = ["count"] * 6 + ["position"] + ["size"] * 10  # position: one question, the type that got worse
    samples = [VQASample(question_id=i, image=images[i % len(images)], question=f"{kind} question {i}?",
                         answers=["two"] * 10, question_type=kind) for i, kind in enumerate(kinds)]
    metrics = {"zero-shot": {"count": 10.0, "size": 20.0, "position": 100.0},
               "tuned": {"count": 90.0, "size": 80.0, "position": 0.0}}
    results = {run: {"metrics": {"vqa_accuracy": 50.0, **{f"vqa_accuracy_by_question/{k}": v for k, v in m.items()}},
                     "predictions": {s.question_id: "two" for s in samples}, "errors": [], "num_samples": len(samples)}
               for run, m in metrics.items()}
    curves = tmp_path / "curves.png"
    Image.new("RGB", (20, 10), (0, 90, 200)).save(curves)
    about = {"model": "embedded:blip:vqa", "method": "prefix", "run": "out/vqa/prefix"}
    page = report.write_report(tmp_path, "vqa", samples, results, examples=3, about=about, curves=curves)["html"].read_text()
    assert "mmprefix evaluation: vqa, prefix on embedded:blip:vqa" in page
    assert all(f"<td>{value}</td>" in page for value in about.values())
    assert "Accuracy per question type" in page and "<td>position</td><td>100.00</td><td>0.00</td>" in page
    assert page.count("data:image/png;base64,") == 1
    shown = [k for k in ("count", "size", "position") if any(f"{k} question {i}?" in page for i in range(len(kinds)))]
    assert shown == ["count", "size", "position"]
    assert report.pick_examples(samples, 3) == [0, 6, 7] and len(report.pick_examples(samples, 12)) == 12

    captions = [CaptionSample(image_id=i, image=image, captions=["a red circle"]) for i, image in enumerate(images)]
    runs = {"base": {"metrics": {"CIDEr": 1.0}, "predictions": {i: "a red circle" for i in range(len(images))},
                     "errors": [], "num_samples": len(images)}}
    page = report.write_report(tmp_path / "captions", "caption", captions, runs)["html"].read_text()
    assert "<th>input</th>" not in page and "<th>image</th><th>references</th><th>base</th>" in page


# -- classification and retrieval ------------------------------------------------------------------------------

COLORS = {"red": (255, 0, 0), "green": (0, 200, 0), "blue": (0, 0, 255), "orange": (200, 100, 0)}


class StubProcessor:
    """Images become their mean colour; a text becomes the index of the colour word in it."""

    @staticmethod
    def tokenizer(text):
        return {"input_ids": [0]}

    def __call__(self, text=None, images=None, return_tensors="pt", padding=False):
        if images is not None:
            return {"pixel_values": torch.tensor(np.array([np.asarray(i, dtype=np.float64).mean((0, 1)) for i in images]))}
        ids = torch.tensor([[next(i for i, c in enumerate(("red", "green", "blue")) if c in t)] for t in text])
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


class StubClip(torch.nn.Module):
    """A CLIP whose image features are RGB and text features one-hot colours: cosine similarities by hand."""

    def get_image_features(self, pixel_values):
        return pixel_values

    def get_text_features(self, input_ids, attention_mask=None):
        return torch.eye(3)[input_ids[:, 0]]


@pytest.fixture(scope="module")
def colour_images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("colours")
    paths = {}
    for name, rgb in COLORS.items():
        paths[name] = str(folder / f"{name}.png")
        Image.new("RGB", (8, 8), rgb).save(paths[name])
    return paths


def test_classification_and_retrieval_by_hand(colour_images):
    # red image "red": hit; green "green": hit; blue labelled "red": blue wins, then red ties green (ties count
    # against: rank 3); orange labelled "green": red wins, green second. top1 2/4, top5 (3 classes) 4/4.
    samples = [(colour_images["red"], "red"), (colour_images["green"], "green"), (colour_images["blue"], "red"),
               (colour_images["orange"], 1)]
    scores = evaluation.classify(StubClip(), StubProcessor(), samples, ["red", "green", "blue"],
                                 templates=("a photo of a {}.", "a {} thing"))
    assert scores == {"top1": 50.0, "top5": 100.0}

    # texts: t0 "red" (image 0), t1 "green" and t2 "blue" (image 1), t3 "red" (image 2, blue)
    # image->text: image 0 ties t3 (rank 1), image 1 hit, image 2's only text scores 0 against t2's 1 (rank 3)
    # text->image: t0, t1 hits; t2 and t3 score 0 on their image and on every other (rank 2)
    captions = [CaptionSample(0, colour_images["red"], ["red"]), CaptionSample(1, colour_images["green"], ["green", "blue"]),
                CaptionSample(2, colour_images["blue"], ["red"]), CaptionSample(3, colour_images["blue"], [])]
    recall = evaluation.retrieve(StubClip(), StubProcessor(), captions)
    assert recall == {"i2t_R@1": 33.33, "i2t_R@5": 100.0, "i2t_R@10": 100.0,
                      "t2i_R@1": 50.0, "t2i_R@5": 100.0, "t2i_R@10": 100.0}

    errors = []
    bad = [*samples, (str(Path(colour_images["red"]).parent / "missing.png"), "red")]
    assert evaluation.classify(StubClip(), StubProcessor(), bad, ["red", "green", "blue"], on_bad_image="skip",
                               errors=errors) == scores
    assert len(errors) == 1 and errors[0]["id"] == 4
    with pytest.raises(ValueError, match="not in classnames"):
        evaluation.classify(StubClip(), StubProcessor(), [(colour_images["red"], "pink")], ["red"])


COLOURS5 = ["red", "blue", "green", "yellow", "purple"]  # words of the embedded tokenizers' vocabulary


def _expected_top1(image_features, class_features, labels):
    logits = F.normalize(image_features, dim=-1) @ class_features.T
    return round(100 * (logits.argmax(1) == torch.tensor(labels)).double().mean().item(), 2)


@pytest.mark.parametrize("kind", ["transformers", "open_clip"])
def test_clip_models_classify_and_retrieve_with_prefix_routing(kind, images):
    if kind == "transformers":
        base, processor = tiny.clip(), tiny.world_clip_processor()

        def encode(model, pictures, texts):
            pixels = processor(images=pictures, return_tensors="pt")["pixel_values"]
            tokens = processor(text=texts, return_tensors="pt", padding=True)
            return (model.get_image_features(pixel_values=pixels).pooler_output,
                    model.get_text_features(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"]).pooler_output)
    else:
        base, processor = tiny.open_clip_model(), (tiny.open_clip_tokenizer, tiny.open_clip_preprocess)

        def encode(model, pictures, texts):
            return (model.encode_image(torch.stack([tiny.open_clip_preprocess(p) for p in pictures])),
                    model.encode_text(tiny.open_clip_tokenizer(texts)))

    classnames = ["red", "blue", "green"]
    samples = [(path, classnames[i % 3]) for i, path in enumerate(images)]
    pictures = [Image.open(p).convert("RGB") for p in images]
    model = add_prefix(base, PrefixConfig(num_virtual_tokens=3, init_std=1.0), name="p")
    got = {}
    for prefix in (None, "p"):
        with torch.no_grad(), model.using(prefix):
            image_features, text_features = encode(model, pictures, [f"a photo of a {c}." for c in classnames])
        classes = F.normalize(text_features, dim=-1)
        got[prefix] = evaluation.classify(model, processor, samples, classnames, prefix=prefix, batch_size=2)
        assert got[prefix]["top1"] == _expected_top1(image_features, classes, [i % 3 for i in range(5)])
        with torch.no_grad(), model.using(prefix):
            image_features, text_features = encode(model, pictures, [f"a {c} shape" for c in COLOURS5])
        similarity = F.normalize(image_features, dim=-1) @ F.normalize(text_features, dim=-1).T
        expected = {k: round(100 * v, 2) for k, v in metrics.retrieval_recall(similarity, [0, 1, 2, 3, 4]).items()}
        captions = [CaptionSample(i, p, [f"a {c} shape"]) for i, (p, c) in enumerate(zip(images, COLOURS5))]
        assert evaluation.retrieve(model, processor, captions, prefix=prefix, batch_size=3) == pytest.approx(expected)
    with torch.no_grad():
        unwrapped_images, _ = encode(model.remove_prefix(), pictures, ["a"])
    assert not torch.allclose(unwrapped_images, image_features)  # the prefix changed the features


def test_read_classification(tmp_path, colour_images):
    for name in ("cat", "dog"):
        (tmp_path / "folder" / name).mkdir(parents=True)
        Image.new("RGB", (4, 4)).save(tmp_path / "folder" / name / "a.png")
    (tmp_path / "folder" / "dog" / "notes.txt").write_text("not an image")
    samples, classes = read_classification(tmp_path / "folder")
    assert classes == ["cat", "dog"] and [(Path(p).parent.name, c) for p, c in samples] == [("cat", "cat"), ("dog", "dog")]
    (tmp_path / "data.jsonl").write_text('{"image": "folder/cat/a.png", "label": "cat"}\n\n{"image": "x.png", "label": 3}\n')
    samples, classes = read_classification(tmp_path / "data.jsonl")
    assert samples[0] == (str(tmp_path / "folder" / "cat" / "a.png"), "cat") and classes == ["3", "cat"]
    (tmp_path / "broken.jsonl").write_text('{"image": "a.png"}\n')
    with pytest.raises(ValueError, match="line 1"):
        read_classification(tmp_path / "broken.jsonl")


# -- the command -----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, images):
    """A tiny BLIP-VQA folder with its processor, a prefix for it, and VQA data in JSONL."""
    folder = tmp_path_factory.mktemp("cli")
    model = tiny.world_blip()
    model.save_pretrained(folder / "blip")
    tiny.world_blip_processor().save_pretrained(folder / "blip")
    add_prefix(model, PrefixConfig(num_virtual_tokens=4, init_std=0.5)).save_prefix(folder / "prefix")
    rows = [{"question_id": i, "image": p, "question": q, "answers": ["blue"] * 10, "question_type": "what",
             "answer_type": "other"} for i, (p, q) in enumerate(zip(images, QUESTIONS))]
    (folder / "vqa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def test_cli_end_to_end_and_resume(checkpoint, tmp_path, capsys, images):
    argv = ["--task", "vqa", "--model", str(checkpoint / "blip"), "--data", str(checkpoint / "vqa.jsonl"),
            "--prefix", f"tuned={checkpoint / 'prefix'}", "--output-dir", str(tmp_path), "--max-new-tokens", "3",
            "--batch-size", "2", "--limit", "4", "--no-progress"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "| run | vqa_accuracy | vqa_accuracy/other | samples | errors |" in out and "| tuned |" in out
    assert str(tmp_path / "report.html") in out
    summary = json.loads((tmp_path / "results.json").read_text())
    assert list(summary["runs"]) == ["base", "tuned"] and summary["settings"]["max_new_tokens"] == 3
    base = json.loads((tmp_path / "base" / "results.json").read_text())
    assert [r["question_id"] for r in base] == [0, 1, 2, 3]
    model, processor = tf.BlipForQuestionAnswering.from_pretrained(checkpoint / "blip"), tiny.world_blip_processor()
    expected, _ = evaluation.predict("vqa", model.eval(), processor, vqa_samples(images)[:4], **SETTINGS)
    assert {r["question_id"]: r["answer"] for r in base} == expected

    before = (tmp_path / "tuned" / "predictions.jsonl").read_text()
    assert cli.main(argv) == 0  # a rerun finds every prediction on disk
    assert (tmp_path / "tuned" / "predictions.jsonl").read_text() == before
    capsys.readouterr()
    assert cli.main([*argv, "--num-beams", "2"]) == 2  # other decoding settings never mix into the same files
    assert "holds predictions made with" in capsys.readouterr().err


def test_cli_errors_are_messages_not_tracebacks(checkpoint, tmp_path, capsys, monkeypatch):
    common = ["--task", "vqa", "--data", str(checkpoint / "vqa.jsonl"), "--output-dir", str(tmp_path), "--no-progress"]
    assert cli.main(["--model", str(tmp_path / "no-such-model"), *common]) == 2
    assert "cannot load model" in capsys.readouterr().err
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert cli.main(["--model", "nobody/no-such-model", *common]) == 2
    assert "not in the local Hugging Face cache and the hub is offline" in capsys.readouterr().err
    import mmprefix.embedded

    monkeypatch.setattr(mmprefix.embedded, "ASSETS", tmp_path / "no-assets")
    assert cli.main(["--model", "embedded:blip", *common]) == 2
    assert "python -m mmprefix.embedded.pretrain blip" in capsys.readouterr().err
    assert cli.main(["--model", str(checkpoint / "blip"), *common, "--prefix", f"p={tmp_path}"]) == 2
    assert "cannot load prefix 'p'" in capsys.readouterr().err
    assert cli.main(["--model", str(checkpoint / "blip"), *common[:-3]]) == 2
    assert "missing --output-dir" in capsys.readouterr().err

    env = dict(os.environ, HF_HUB_OFFLINE="1")
    done = subprocess.run([sys.executable, str(ROOT / "eval" / "evaluate.py"), "--model", "nobody/no-such-model",
                           *common], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 2 and "Traceback" not in done.stderr and "cannot load model" in done.stderr


def test_model_classes_follow_task_and_architecture():
    assert loading.pick_class("vqa", tiny.blip_config()) is tf.BlipForQuestionAnswering
    assert loading.pick_class("caption", tiny.blip_config()) is tf.BlipForConditionalGeneration
    config = tiny.world_blip2().config
    assert loading.pick_class("vqa", config) is tf.Blip2ForConditionalGeneration
    assert loading.pick_class("text", tiny.llama().config) is tf.AutoModelForCausalLM
    with pytest.raises(loading.LoadError, match="no caption evaluation for model_type 'llama'"):
        loading.pick_class("caption", tiny.llama().config)


CONFIGS = sorted((ROOT / "eval" / "configs").glob("*.yaml"))


def test_example_configs_parse_and_run_on_tiny_stand_ins(checkpoint, tmp_path, images):
    assert len(CONFIGS) >= 3
    for path in CONFIGS:
        settings = cli.settings_from(["--config", str(path)])
        assert settings.task in evaluation.TASKS and settings.output_dir
    flags = cli.settings_from(["--config", str(CONFIGS[0]), "--num-beams", "4", "--prefix", "x=y", "examples=3"])
    assert flags.num_beams == 4 and flags.prefix == ["x=y"] and flags.examples == 3  # flags win over the config

    # COCO Karpathy with a tiny BLIP captioner: the config's format and reader options, on a tiny split file
    captioner = tiny.world_blip(tf.BlipForConditionalGeneration)
    captioner.save_pretrained(tmp_path / "captioner")
    tiny.world_blip_processor().save_pretrained(tmp_path / "captioner")
    (tmp_path / "val2014").mkdir()
    entries = []
    for i, image in enumerate(images[:3]):
        Image.open(image).save(tmp_path / "val2014" / f"COCO_val2014_{i:012d}.jpg")
        entries.append({"filepath": "val2014", "filename": f"COCO_val2014_{i:012d}.jpg", "cocoid": i,
                        "split": "test" if i < 2 else "train", "sentences": [{"raw": "a red circle"}, {"raw": "blue"}]})
    (tmp_path / "karpathy.json").write_text(json.dumps({"images": entries}))
    argv = ["--config", str(ROOT / "eval/configs/coco_karpathy_blip.yaml"), "--model", str(tmp_path / "captioner"),
            "--data", str(tmp_path / "karpathy.json"), "--data-option", f"image_root={tmp_path}", "--no-meteor",
            "--output-dir", str(tmp_path / "coco"), "--no-progress", "--max-new-tokens", "3"]
    assert cli.main(argv) == 0
    summary = json.loads((tmp_path / "coco" / "results.json").read_text())
    assert summary["runs"]["base"]["num_predictions"] == 2 and "CIDEr" in summary["runs"]["base"]["metrics"]
    assert summary["settings"]["num_beams"] == 3 and summary["settings"]["format"] == "karpathy"

    # VQAv2 with a tiny BLIP-2: the official questions/annotations pair
    from mmprefix.embedded import blip2_processor

    tiny.world_blip2().save_pretrained(tmp_path / "blip2")
    blip2_processor().save_pretrained(tmp_path / "blip2")
    questions = {"data_subtype": "val2014", "questions": [{"question_id": 10 + i, "image_id": i, "question": q}
                                                          for i, q in enumerate(QUESTIONS[:2])]}
    annotations = {"annotations": [{"question_id": 10 + i, "image_id": i, "question_type": "what", "answer_type": "other",
                                    "answers": [{"answer": "blue", "answer_id": k} for k in range(10)]} for i in range(2)]}
    (tmp_path / "q.json").write_text(json.dumps(questions))
    (tmp_path / "a.json").write_text(json.dumps(annotations))
    argv = ["--config", str(ROOT / "eval/configs/vqav2_val_blip2.yaml"), "--model", str(tmp_path / "blip2"),
            "--data", str(tmp_path / "q.json"), "--data-option", f"annotations={tmp_path / 'a.json'}",
            "--data-option", f"image_root={tmp_path / 'val2014'}", "--output-dir", str(tmp_path / "vqav2"),
            "--no-progress", "--max-new-tokens", "2", "--num-beams", "1"]
    assert cli.main(argv) == 0
    official = json.loads((tmp_path / "vqav2" / "base" / "results.json").read_text())
    assert [r["question_id"] for r in official] == [10, 11]

    # the embedded world config, with the checkpoint standing in for embedded:blip
    argv = ["--config", str(ROOT / "eval/configs/world_vqa_embedded.yaml"), "--model", str(checkpoint / "blip"),
            "--data", str(checkpoint / "vqa.jsonl"), "--output-dir", str(tmp_path / "world"), "--no-progress"]
    assert cli.main(argv) == 0 and (tmp_path / "world" / "report.html").is_file()


def test_cli_classification_and_retrieval(tmp_path, colour_images):
    model = tiny.clip()
    model.save_pretrained(tmp_path / "clip")
    tiny.world_clip_processor().save_pretrained(tmp_path / "clip")
    (tmp_path / "cls.jsonl").write_text("".join(json.dumps({"image": p, "label": n}) + "\n"
                                                for n, p in colour_images.items()))
    common = ["--model", str(tmp_path / "clip"), "--no-progress", "--prefix"]
    prefix = tmp_path / "prefix"
    add_prefix(tiny.clip(), PrefixConfig(num_virtual_tokens=2)).save_prefix(prefix)
    assert cli.main(["--task", "classification", "--data", str(tmp_path / "cls.jsonl"), *common, f"p={prefix}",
                     "--output-dir", str(tmp_path / "cls"), "--template", "a {} shape"]) == 0
    runs = json.loads((tmp_path / "cls" / "results.json").read_text())["runs"]
    samples, classnames = read_classification(tmp_path / "cls.jsonl")
    assert runs["base"]["metrics"] == evaluation.classify(tiny.clip(), tiny.world_clip_processor(), samples, classnames,
                                                          templates=["a {} shape"])
    (tmp_path / "caps.jsonl").write_text("".join(json.dumps({"image": p, "image_id": n, "captions": [f"a {n} square"]})
                                                 + "\n" for n, p in colour_images.items()))
    assert cli.main(["--task", "retrieval", "--data", str(tmp_path / "caps.jsonl"), *common, f"p={prefix}",
                     "--output-dir", str(tmp_path / "ret")]) == 0
    assert "i2t_R@1" in json.loads((tmp_path / "ret" / "results.json").read_text())["runs"]["p"]["metrics"]


def test_blip2_inputs_carry_the_image_tokens_and_answers_depend_on_the_image():
    """BLIP-2's processor inserts its image tokens only when it also gets the images."""
    from mmprefix.embedded import QUERY_TOKENS, blip2_processor
    from mmprefix.embedded.pretrain import blip2_model

    torch.manual_seed(0)
    model, processor = blip2_model().eval(), blip2_processor()
    images = [Image.new("RGB", (64, 64), color) for color in ((250, 10, 10), (10, 10, 250))]
    batch = formatting.vqa_batch(model, processor, images, ["what color is it?"] * 2, ["red", "blue"])
    assert ((batch["input_ids"] == model.config.image_token_index).sum(1) == QUERY_TOKENS).all()
    with torch.no_grad():
        loss = model(**batch).loss
        swapped = model(**{**batch, "pixel_values": batch["pixel_values"].flip(0)}).loss
    assert not torch.isclose(loss, swapped)
