"""The recipes end to end: on tiny stand-ins of every configured architecture, with every method, on two
processes, resumed; and the real-checkpoint configs fail clearly where the checkpoint or data is missing."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import open_clip
import pytest
import torch
from PIL import Image

import tiny_families

from mmprefix.experiment import settings
from mmprefix.embedded import blip2_processor, blip_processor, clip_processor, pretrain, text

ROOT = Path(__file__).resolve().parents[2]
RECIPES = {name: ROOT / "recipes" / f"{name}.py" for name in ("vqa", "captioning", "textgen", "classification")}
PRIMARY = {"vqa": "vqa_accuracy", "captioning": "CIDEr", "textgen": "Bleu_4", "classification": "top1"}
QUICK = ["train.max_steps=4", "train.batch_size=4", "train.eval_every=2", "train.save_every=2", "train.log_every=2",
         "eval.batch_size=16", "eval.meteor=false"]


def load(name):
    spec = importlib.util.spec_from_file_location(f"recipe_{name}", RECIPES[name])
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def stand_ins(tmp_path_factory):
    """Random-weight models of the configured architectures, saved like checkpoints, with their processors."""
    folder = tmp_path_factory.mktemp("checkpoints")
    torch.manual_seed(0)
    for name, (build, processor) in {
        "blip": (pretrain.blip_model, blip_processor),
        "blip2": (pretrain.blip2_model, blip2_processor),
        "lm": (pretrain.lm_model, text.lm_tokenizer),
        "clip": (pretrain.clip_model, clip_processor),
    }.items():
        build().save_pretrained(folder / name)
        processor().save_pretrained(folder / name)
    for name in ("llava", "qwen2_5_vl", "smolvlm", "paligemma"):  # today's VLMs, with their real processor classes
        tiny_families.CASES[name].build().save_pretrained(folder / name)
        tiny_families.CASES[name].processor().save_pretrained(folder / name)
    # open_clip: a tiny ViT model config registered offline, with the real tokenizer's vocabulary
    (folder / "open_clip").mkdir()
    (folder / "open_clip" / "mmprefix-recipe-clip.json").write_text(json.dumps(dict(
        embed_dim=16, vision_cfg=dict(image_size=32, layers=1, width=32, head_width=8, patch_size=8),
        text_cfg=dict(context_length=16, vocab_size=49408, width=32, heads=4, layers=1))))
    open_clip.add_model_config(folder / "open_clip")
    return folder


def world(split_limits):
    return [f"data.{split}.limit={n}" for split, n in split_limits.items()]


@pytest.mark.parametrize("name, checkpoint", [("vqa", "blip"), ("captioning", "blip"), ("textgen", "lm"),
                                              ("classification", "clip")])
def test_a_recipe_writes_everything_it_promises(name, checkpoint, stand_ins, tmp_path, capsys):
    out = tmp_path / name
    summary = load(name).main([f"model={stand_ins / checkpoint}", f"output_dir={out}", *QUICK,
                               *world({"train": 40, "val": 8, "test": 12})])
    printed = capsys.readouterr().out
    assert "trainable parameters" in printed and "zero-shot" in printed and str(out) in printed
    metrics = json.loads((out / "metrics.json").read_text())
    assert PRIMARY[name] in metrics["zero_shot"] and PRIMARY[name] in metrics["tuned"] and metrics == summary
    assert 0 < metrics["trainable_percent"] < 3
    for path in ("prefix/prefix_config.json", "prefix/prefix.safetensors", "log.jsonl", "curves.png",
                 "report.html", "results.md", "zero-shot/metrics.json", "tuned/metrics.json"):
        assert (out / path).is_file(), path
    assert (out / "checkpoints" / "step-00000004" / "complete").is_file()
    if name != "classification":  # scores only: no official prediction format
        official = json.loads((out / "tuned" / "results.json").read_text())
        key = {"vqa": "question_id", "captioning": "image_id", "textgen": "id"}[name]
        assert len(official) == 12 and all(key in row for row in official)


def test_classification_trains_on_the_models_own_similarities(stand_ins):
    """The training logits are the model's scaled similarities to each class's mean prompt embedding, which
    is how the evaluation harness ranks classes."""
    from mmprefix import evaluation
    from mmprefix.data import formatting
    from mmprefix.evaluation import contrastive

    model = pretrain.clip_model().eval()
    processor = clip_processor()
    images = [Image.new("RGB", (64, 64), color) for color in ((200, 30, 30), (30, 30, 200), (30, 200, 30))]
    classnames, templates = ["red", "blue"], ["the shape on the left is {}", "a {} shape"]
    batch = formatting.classification_batch(model, processor, images, [0, 1, 0], classnames, templates)
    with torch.no_grad():
        logits = contrastive.classification_logits(model, batch)
        pixels = processor(images=images, return_tensors="pt")["pixel_values"]
        image = torch.nn.functional.normalize(model.get_image_features(pixel_values=pixels).pooler_output, dim=-1)
        texts = processor(text=formatting.class_prompts(classnames, templates), return_tensors="pt", padding=True)
        text = torch.nn.functional.normalize(model.get_text_features(**texts).pooler_output, dim=-1)
    classes = torch.nn.functional.normalize(text.view(2, 2, -1).mean(1), dim=-1)  # classify()'s class embedding
    expected = model.logit_scale.exp() * image @ classes.T
    torch.testing.assert_close(logits, expected)
    loss = contrastive.classification_loss(model, batch)
    torch.testing.assert_close(loss, torch.nn.functional.cross_entropy(expected, torch.tensor([0, 1, 0])))
    samples = list(zip(images, ["red", "blue", "red"]))
    hits = (logits.argmax(-1) == torch.tensor([0, 1, 0])).float().mean().item()
    top1 = evaluation.classify(model, processor, samples, classnames, templates)["top1"]
    assert top1 == pytest.approx(100 * hits, abs=0.01)  # rounded to two decimals
    open_model, _, preprocess = open_clip.create_model_and_transforms("mmprefix-recipe-clip")
    open_model.eval()
    tokenizer = open_clip.get_tokenizer("mmprefix-recipe-clip")
    batch = formatting.classification_batch(open_model, (tokenizer, preprocess), images, [0, 1, 0], classnames, templates[:1])
    with torch.no_grad():
        logits = contrastive.classification_logits(open_model, batch)
        image = open_model.encode_image(batch["image"], normalize=True)
        text = open_model.encode_text(batch["text"], normalize=True)
    torch.testing.assert_close(logits, open_model.logit_scale.exp() * image @ text.T)
    ranked = evaluation.classify(open_model, (tokenizer, preprocess), samples, classnames, templates[:1])
    hits = (logits.argmax(-1) == torch.tensor([0, 1, 0])).float().mean().item()
    assert ranked["top1"] == pytest.approx(100 * hits, abs=0.01)


RECIPE_CHECKPOINTS = [("vqa", "blip"), ("captioning", "blip"), ("textgen", "lm"), ("classification", "clip")]
# The memory and the adapters: two recipes each in the default suite, all four in the slow one
COMPARED = [pytest.param(name, checkpoint, method,
                         marks=[pytest.mark.slow] if method in ("memory", "adapter") and
                         (name, method) not in {("vqa", "memory"), ("textgen", "memory"), ("classification", "adapter"),
                                                ("captioning", "adapter")} else [])
            for name, checkpoint in RECIPE_CHECKPOINTS for method in ("prompt", "memory", "lora", "adapter", "full")]


@pytest.mark.parametrize("name, checkpoint, method", COMPARED)
def test_the_comparison_methods_run_through_the_same_recipe(name, checkpoint, method, stand_ins, tmp_path):
    out = tmp_path / method
    metrics = load(name).main([f"model={stand_ins / checkpoint}", f"output_dir={out}", "--method", method, *QUICK,
                               *world({"train": 24, "val": 6, "test": 6})])
    assert (metrics["trainable_percent"] == 100) == (method == "full")
    saved = {"prompt": "prompt/prefix.safetensors", "memory": "memory/prefix.safetensors",
             "lora": "lora/adapter_model.safetensors", "adapter": "adapter/bottleneck.safetensors",
             "full": "model/config.json"}
    assert (out / saved[method]).is_file() and not (out / "prefix").exists()


VQA_YAML = RECIPES["vqa"].parent / "configs" / "vqa.yaml"


def test_a_dataset_of_unreadable_images_ends_the_recipe_with_one_line(stand_ins, tmp_path, capsys):
    rows = [{"question_id": i, "image": f"gone-{i}.png", "question": "how many?", "answers": ["two"]} for i in range(4)]
    (tmp_path / "vqa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = [f"data.{split}={{path: {tmp_path / 'vqa.jsonl'}}}" for split in ("train", "val", "test")]
    code = settings.run(load("vqa").main, [f"model={stand_ins / 'blip'}", f"output_dir={tmp_path / 'out'}", *data,
                                           "data.on_bad_image=skip"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("recipe: error: none of the 4 images could be read (e.g. ")


def parse(*argv):
    return settings.recipe_settings(list(argv), "vqa", VQA_YAML)


def test_flags_and_overrides():
    config = parse("--max-steps", "7", "--method", "lora", "--seed", "3", "--resume", "train.learning_rate=0.5",
                   "prefix.num_virtual_tokens=4", "prefix.init_text=describe: a red circle",
                   "eval.generation={num_beams: 3}", "prefix.targets=[text]", "train.mixed_precision=no")
    assert config.train.max_steps == 7 and config.train.seed == 3 and config.train.resume is True
    assert config.method == "lora" and config.train.learning_rate == 0.5
    assert config.prefix.num_virtual_tokens == 4 and config.prefix.targets == ["text"]
    assert config.prefix.init_text == "describe: a red circle"  # a text field takes the text as written
    assert config.eval.generation == {"num_beams": 3} and config.train.mixed_precision == "no"
    assert config.output_dir == "out/vqa/lora", "each method writes into its own folder"
    rates = {method: parse("--method", method).train.learning_rate for method in ("prefix", "lora", "full")}
    assert rates == {"prefix": 0.03, "lora": 1e-3, "full": 3e-4}  # a method's own rate, else train's
    full = parse("--method", "full", "train.learning_rate=0.1")
    assert full.train.learning_rate == 0.1 and full.method_options() == {}  # the command line wins
    assert parse("train.learning_rate=3e-3").train.learning_rate == 0.003  # the docs' override: a number
    with pytest.raises(settings.SettingsError, match="'no_equals_sign' is not key=value"):
        parse("no_equals_sign")
    with pytest.raises(settings.SettingsError, match="config file /nowhere.yaml does not exist"):
        parse("--config", "/nowhere.yaml")


def _images(folder, names):
    folder.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(names):
        Image.new("RGB", (48, 40), (40 * i % 255, 90, 200)).save(folder / name)


def vqav2_files(root):
    """A VQAv2 question/annotation pair for train2014 and val2014, with their COCO-named images."""
    for split in ("train2014", "val2014"):
        ids = [1, 2, 3, 4, 5, 6]
        _images(root / split, [f"COCO_{split}_{i:012d}.jpg" for i in ids])
        questions = [{"image_id": i, "question": "what color is it?", "question_id": i * 10} for i in ids]
        annotations = [{"question_id": i * 10, "image_id": i, "answer_type": "other", "question_type": "what color",
                        "answers": [{"answer": "blue", "answer_confidence": "yes", "answer_id": k} for k in range(10)],
                        "multiple_choice_answer": "blue"} for i in ids]
        (root / f"v2_OpenEnded_mscoco_{split}_questions.json").write_text(
            json.dumps({"questions": questions, "data_subtype": split}))
        (root / f"v2_mscoco_{split}_annotations.json").write_text(json.dumps({"annotations": annotations}))


def karpathy_file(root):
    images = []
    for i in range(18):
        split = ("train", "val", "test")[i % 3]
        folder = "train2014" if split == "train" else "val2014"
        _images(root / folder, [f"img{i}.jpg"])
        images.append({"filepath": folder, "filename": f"img{i}.jpg", "split": split, "cocoid": i,
                       "sentences": [{"raw": "a blue square"}, {"raw": "a square in blue"}]})
    (root / "dataset_coco.json").write_text(json.dumps({"images": images}))


def text_files(root):
    root.mkdir(parents=True, exist_ok=True)
    rows = [{"prompt": f"circle | red | {s} ->", "target": f"the circle is red and {s}"} for s in ("small", "large")]
    for split in ("train", "val", "test"):
        (root / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows * 4))


def imagenet_folders(root):
    """ImageNet's layout: train/ and val/ with a folder per class id, and classnames.json naming each id."""
    for split in ("train", "val"):
        for i, wnid in enumerate(("n01440764", "n01443537")):
            _images(root / split / wnid, [f"{split}_{wnid}_{k}.JPEG" for k in range(3 + i)])
    (root / "classnames.json").write_text(json.dumps({"n01440764": "tench", "n01443537": "goldfish"}))


REAL = {  # config -> (recipe, stand-in checkpoint, data environment variable, data builder)
    "vqa_blip_vqav2.yaml": ("vqa", "blip", "VQAV2", vqav2_files),
    "vqa_blip2_vqav2.yaml": ("vqa", "blip2", "VQAV2", vqav2_files),
    "captioning_blip_coco.yaml": ("captioning", "blip", "COCO", karpathy_file),
    "captioning_blip2_coco.yaml": ("captioning", "blip2", "COCO", karpathy_file),
    "textgen_llama.yaml": ("textgen", "lm", "TEXTGEN", text_files),
    "vqa_llava_vqav2.yaml": ("vqa", "llava", "VQAV2", vqav2_files),
    "vqa_qwen2_5_vl_vqav2.yaml": ("vqa", "qwen2_5_vl", "VQAV2", vqav2_files),
    "vqa_paligemma_vqav2.yaml": ("vqa", "paligemma", "VQAV2", vqav2_files),
    "captioning_smolvlm_coco.yaml": ("captioning", "smolvlm", "COCO", karpathy_file),
    "classification_openclip_imagenet.yaml": ("classification", "open_clip:mmprefix-recipe-clip", "IMAGENET",
                                              imagenet_folders),
}


def stand_in(stand_ins, checkpoint):
    return checkpoint if checkpoint.startswith("open_clip:") else stand_ins / checkpoint


# The chat VLMs' recipe runs cost 15-45 s each here: LLaVA's stays in the default suite, the others run with the slow ones.
SLOW_REAL = {"vqa_qwen2_5_vl_vqav2.yaml", "vqa_paligemma_vqav2.yaml", "captioning_smolvlm_coco.yaml"}


@pytest.mark.parametrize("config", [pytest.param(c, marks=pytest.mark.slow) if c in SLOW_REAL else c for c in sorted(REAL)])
def test_real_checkpoint_configs_build_on_tiny_stand_ins(config, stand_ins, tmp_path, monkeypatch):
    name, checkpoint, variable, build = REAL[config]
    build(tmp_path / "data")
    monkeypatch.setenv(variable, str(tmp_path / "data"))
    path = RECIPES[name].parent / "configs" / config
    overrides = [f"model={stand_in(stand_ins, checkpoint)}", f"output_dir={tmp_path / 'out'}", *QUICK,
                 "train.mixed_precision=no", "train.num_workers=0", "data.val.limit=2", "data.test.limit=3"]
    metrics = load(name).main(["--config", str(path), *overrides])
    assert set(metrics) >= {"zero_shot", "tuned"}


@pytest.mark.parametrize("config", sorted(REAL))
def test_real_checkpoint_configs_fail_clearly_without_checkpoint_or_data(config, stand_ins, tmp_path, monkeypatch,
                                                                         capsys):
    name, checkpoint, variable, _ = REAL[config]
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv(variable, str(tmp_path / "no-data"))
    path = RECIPES[name].parent / "configs" / config
    module = load(name)
    assert settings.run(module.main, ["--config", str(path), f"output_dir={tmp_path}"]) == 2
    assert "cannot load" in capsys.readouterr().err
    assert settings.run(module.main, ["--config", str(path), f"model={stand_in(stand_ins, checkpoint)}",
                                    f"output_dir={tmp_path}"]) == 2
    assert "does not exist" in capsys.readouterr().err
    monkeypatch.delenv(variable)  # an unset data variable is named before anything loads
    assert settings.run(module.main, ["--config", str(path), f"output_dir={tmp_path}"]) == 2
    assert f"uses ${variable}, which is not set" in capsys.readouterr().err


def test_offline_an_uncached_open_clip_checkpoint_is_refused_before_any_download(monkeypatch, tmp_path):
    from mmprefix.models import loading

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.cache/clip download either

    def download(*args, **kwargs):
        raise AssertionError("open_clip was asked to fetch weights offline (minutes of retries)")

    monkeypatch.setattr(open_clip, "create_model_and_transforms", download)
    with pytest.raises(loading.LoadError, match="its weights are not in the local cache and the hub is offline"):
        loading.load_model("open_clip:ViT-B-32:laion2b_s34b_b79k", "classification")


@pytest.mark.slow  # seconds of subprocesses or a JVM: the slow suite (CI runs it too)
def test_two_processes_with_accelerate_launch(stand_ins, tmp_path):
    out = tmp_path / "two"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    result = subprocess.run([*launch, str(RECIPES["vqa"]), f"model={stand_ins / 'blip'}", f"output_dir={out}", *QUICK,
                             *world({"train": 24, "val": 4, "test": 6})], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((out / "metrics.json").read_text())["tuned"]
    # the processes trained together: one log line per step (processes that each ran alone would all write)
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [2, 4]


def test_resume_continues_from_the_last_checkpoint(stand_ins, tmp_path, capsys):
    arguments = [f"model={stand_ins / 'lm'}", f"output_dir={tmp_path}", *QUICK, *world({"train": 40, "val": 4, "test": 4})]
    load("textgen").main(arguments)
    first = json.loads((tmp_path / "metrics.json").read_text())
    load("textgen").main([*arguments, "--resume", "train.max_steps=6"])  # overrides come after flags: they win
    assert "resuming from" in capsys.readouterr().out
    records = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [2, 4, 6]
    assert first["tuned"]


# What each recipe, run as written, must at least reach on the embedded default's test split.
ADAPTS = {"vqa": ("vqa_accuracy", 30.0), "captioning": ("CIDEr", 1.0), "textgen": ("Bleu_4", 0.5),
          "classification": ("top1", 10.0)}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(ADAPTS))
def test_recipe_as_written_adapts_the_frozen_backbone(name, tmp_path):
    """README's main job and its siblings: the default config, offline, on the pretrained tiny backbones. The
    tuned score must beat the frozen backbone's zero-shot score by a wide margin."""
    result = subprocess.run([sys.executable, str(RECIPES[name]), "--output-dir", str(tmp_path)],
                            capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    metric, gain = ADAPTS[name]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["tuned"][metric] >= metrics["zero_shot"][metric] + gain, metrics
    assert metrics["trainable_percent"] < 3
    assert f"{metric}: zero-shot" in result.stdout and (tmp_path / "prefix" / "prefix.safetensors").is_file()


def test_a_short_prefix_run_on_the_embedded_default_beats_zero_shot(tmp_path):
    """The claim of the whole project, in the default suite: 40 steps of prefix tuning on the frozen embedded BLIP
    answer the new question types far better than the frozen model alone."""
    summary = load("vqa").main([f"output_dir={tmp_path}", "train.max_steps=40", "train.batch_size=16",
                                "train.learning_rate=0.06", "train.warmup_steps=0", "train.eval_every=0",
                                "train.save_every=0", "data.test.limit=64", "data.val.limit=8"])
    assert summary["tuned"]["vqa_accuracy"] >= summary["zero_shot"]["vqa_accuracy"] + 10, summary
    assert summary["trainable_percent"] < 3


@pytest.mark.slow
def test_the_embedded_llava_recipe_adapts_the_frozen_backbone(tmp_path):
    """recipes/configs/vqa_llava_embedded.yaml as written, offline: the prefix lifts the LLaVA-style backbone on
    the downstream questions far above its zero-shot score."""
    config = RECIPES["vqa"].parent / "configs" / "vqa_llava_embedded.yaml"
    result = subprocess.run([sys.executable, str(RECIPES["vqa"]), "--config", str(config), "--output-dir", str(tmp_path)],
                            capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["tuned"]["vqa_accuracy"] >= metrics["zero_shot"]["vqa_accuracy"] + ADAPTS["vqa"][1], metrics
    assert metrics["trainable_percent"] < 3
