"""TRL's SFTTrainer and DPOTrainer with a prefix model: the real classes on tiny models and their real processors.

References: the loss TRL computes equals the model's own token log-likelihood (a batch with a text-only row: each
row run alone); DPO's reference log-probabilities equal an untouched copy of the base model's, while the reference
holds no weights of its own."""

import copy
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer

import tiny
import tiny_families

from mmprefix import PrefixConfig, add_prefix, load_prefix
from mmprefix.core import saving
from mmprefix.embedded import text
from mmprefix.integrations.trl_trainers import ReferenceModel

CPU = not torch.cuda.is_available()  # TRL's configs default to bf16, which on a CPU needs use_cpu=True
COLORS = ("red", "blue", "green", "orange", "purple", "yellow")


def token_nll(model, batch):
    """Summed negative log-likelihood of ``batch["labels"]`` (shifted, -100 skipped) and how many tokens."""
    inputs = {k: v for k, v in batch.items() if k not in ("labels", "completion_mask")}
    with torch.no_grad():
        logits = model(**inputs).logits[:, :-1]
    targets = batch["labels"][:, 1:]
    nll = -logits.log_softmax(-1).gather(-1, targets.clamp(min=0)[..., None])[..., 0]
    return nll[targets != -100].sum(), (targets != -100).sum()


def frozen_unchanged(model, frozen):
    return all(torch.equal(frozen[k], v) for k, v in model.base_model.state_dict().items())


def test_sft_trainer_with_a_default_config_trains_and_saves_the_prefix(tmp_path):
    tokenizer = text.lm_tokenizer()
    base = tiny.world_llama()
    frozen = copy.deepcopy(base.state_dict())
    model = add_prefix(base, PrefixConfig(num_virtual_tokens=4))
    data = Dataset.from_dict({"prompt": [f"describe: size=small color={c} shape=circle =>" for c in COLORS] * 2,
                              "completion": [f" a small {c} circle" for c in COLORS] * 2})
    trainer = SFTTrainer(model=model, args=SFTConfig(tmp_path / "out", use_cpu=CPU, max_steps=3),
                         train_dataset=data, processing_class=tokenizer)
    batch = next(iter(trainer.get_train_dataloader()))
    total, count = token_nll(model, batch)
    assert trainer.compute_loss(model, dict(batch)).item() == pytest.approx((total / count).item(), rel=1e-5)
    with model.disable_prefix():
        without, _ = token_nll(model, batch)
    assert not torch.isclose(without, total), "the loss is the prefixed model's"
    before = {k: v.clone() for k, v in model.prefixes["default"].tensors().items()}
    trainer.train()
    assert frozen_unchanged(model, frozen)
    trained = model.prefixes["default"].tensors()
    assert any(not torch.equal(before[k], trained[k]) for k in before)
    checkpoint = tmp_path / "out" / "checkpoint-3"
    assert [p.name for p in checkpoint.glob("*.safetensors")] == ["prefix.safetensors"]
    reloaded = load_prefix(tiny.world_llama(), checkpoint).prefixes["default"].tensors()
    assert all(torch.equal(reloaded[k], v) for k, v in trained.items())


def conversation(question, answer, image):
    user = ([{"type": "image"}] if image else []) + [{"type": "text", "text": question}]
    return [{"role": "user", "content": user}, {"role": "assistant", "content": [{"type": "text", "text": answer}]}]


def vlm_rows():
    """Three rows with an image and one text-only row."""
    pictures = tiny_families.images(3)
    rows = [{"messages": conversation(q, a, True), "images": [image]}
            for (q, a), image in zip([("what color is the shape", "red"), ("describe this image", "a red circle"),
                                      ("what is the shape", "a square")], pictures)]
    rows.insert(2, {"messages": conversation("what color is the circle", "blue", False), "images": []})
    return rows


def vlm_collator(processor, nested):
    """The collator TRL's VLM examples write: the chat template, the processor on texts and images, labels the
    input ids with padding and image tokens masked. ``nested``: images as one list per row (Idefics3/SmolVLM)."""
    image_token = processor.tokenizer.convert_tokens_to_ids(processor.image_token)

    def collate(rows):
        texts = [processor.apply_chat_template(row["messages"], tokenize=False) for row in rows]
        images = [row["images"] for row in rows]
        images = images if nested else [image for row in images for image in row]
        batch = processor(text=texts, images=images if any(images) else None, return_tensors="pt", padding=True)
        labels = batch["input_ids"].clone()
        labels[labels == processor.tokenizer.pad_token_id] = -100
        labels[labels == image_token] = -100
        batch["labels"] = labels
        return batch

    return collate


@pytest.mark.parametrize("family", ["llava", "qwen2_vl", "smolvlm"])
def test_sft_trainer_on_a_vlm_with_a_text_only_row_in_the_batch(family, tmp_path):
    case = tiny_families.CASES[family]
    processor = case.processor()
    processor.tokenizer.padding_side = "right"  # for training: a row's tokens sit where they sit alone
    base = case.build()
    frozen = copy.deepcopy(base.state_dict())
    model = add_prefix(base, PrefixConfig(num_virtual_tokens=2))
    rows = vlm_rows()
    collate = vlm_collator(processor, nested=family == "smolvlm")
    trainer = SFTTrainer(model=model, args=SFTConfig(tmp_path / "out", use_cpu=CPU, bf16=False, max_steps=2,
                                                     per_device_train_batch_size=4, learning_rate=0.05),
                         train_dataset=Dataset.from_list(rows), data_collator=collate, processing_class=processor)
    alone = [token_nll(model, collate([row])) for row in rows]
    expected = sum(t for t, _ in alone) / sum(c for _, c in alone)
    assert trainer.compute_loss(model, collate(rows)).item() == pytest.approx(expected.item(), rel=1e-5)
    trainer.train()
    assert frozen_unchanged(model, frozen)
    saved = saving.read_prefix(tmp_path / "out" / "checkpoint-2")[1]
    assert all(torch.equal(saved[k], v) for k, v in model.prefixes["default"].tensors().items())


PAIRS = {"prompt": [f"question : what color is the {s} ? answer :" for s in ("circle", "square", "triangle")] * 4,
         "chosen": [f" {c}" for c in ("red", "blue", "green")] * 4,
         "rejected": [f" {c}" for c in ("orange", "purple", "yellow")] * 4}


def dpo_trainer(model, out, **changes):
    args = DPOConfig(out, use_cpu=CPU, bf16=False, per_device_train_batch_size=4, **changes)
    return DPOTrainer(model=model, args=args, train_dataset=Dataset.from_dict(PAIRS),
                      processing_class=text.lm_tokenizer())


def sequence_logps(model, batch):
    """Each completion's summed log-probability under ``model`` (an independent forward, full logits)."""
    batch = dict(batch, labels=batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100))
    inputs = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask")}
    with torch.no_grad():
        logits = model(**inputs).logits[:, :-1]
    targets = batch["labels"][:, 1:]
    logps = logits.log_softmax(-1).gather(-1, targets.clamp(min=0)[..., None])[..., 0]
    return (logps * (targets != -100)).sum(1)


def test_dpo_reference_is_the_base_model_with_no_copy_of_its_weights(tmp_path):
    base = tiny.world_llama()
    untouched = copy.deepcopy(base)
    torch.manual_seed(1)
    model = add_prefix(base, PrefixConfig(num_virtual_tokens=4, init_std=0.5))
    trainer = dpo_trainer(model, tmp_path / "out", max_steps=12, learning_rate=0.05)
    assert isinstance(trainer.ref_model, ReferenceModel)
    own = {t.data_ptr() for t in model.base_model.state_dict().values()}
    assert own and all(t.data_ptr() in own for t in trainer.ref_model.state_dict().values()), "shared, not copied"
    assert not any(t.data_ptr() in own for t in model.prefixes.state_dict().values())
    batch = next(iter(trainer.get_train_dataloader()))
    chosen, rejected = trainer.compute_ref_log_probs(trainer.ref_model, batch)
    expected = sequence_logps(untouched, batch)
    assert torch.allclose(torch.cat([chosen, rejected]), expected, atol=1e-5)
    assert not torch.allclose(sequence_logps(model, batch), expected, atol=1e-3), "the policy has its prefix"
    trainer.train()
    assert frozen_unchanged(model, untouched.state_dict())
    margins = [log["rewards/margins"] for log in trainer.state.log_history if "rewards/margins" in log]
    assert margins[-1] > 0
    assert [p.name for p in (tmp_path / "out" / "checkpoint-12").glob("*.safetensors")] == ["prefix.safetensors"]


def test_dpo_refuses_a_model_whose_prefix_is_disabled(tmp_path):
    model = add_prefix(tiny.world_llama(), PrefixConfig(num_virtual_tokens=4))
    with model.disable_prefix(), pytest.raises(ValueError, match="inside disable_prefix"):
        dpo_trainer(model, tmp_path / "a")
    model.set_prefix(None)
    with pytest.raises(ValueError, match=r"active prefix is None.*set_prefix\(name\)"):
        dpo_trainer(model, tmp_path / "b")
    model.set_prefix("default")
    model.prefixes.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        dpo_trainer(model, tmp_path / "c")
    model.prefixes.requires_grad_(True)
    with pytest.raises(ValueError, match="sync_ref_model"):
        dpo_trainer(model, tmp_path / "d", sync_ref_model=True)


@pytest.mark.slow  # three processes start torch, transformers and TRL
def test_the_trainers_memory_benchmark_runs_at_reduced_size():
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run([sys.executable, str(root / "benchmarks" / "trainers_memory.py"), "--reduced"], cwd=root,
                          capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(root)})
    assert done.returncode == 0, done.stderr[-3000:]
    rows = re.findall(r"^\| (sft|dpo|dpo, copied reference) \| (\d+) MiB \| ([\d.]+) \| ([\d.]+) \|$", done.stdout, re.M)
    assert [r[0] for r in rows] == ["sft", "dpo", "dpo, copied reference"], done.stdout
    assert rows[0][3] == "1.00" and all(int(r[1]) > 0 for r in rows)
    assert "DPO's reference (the prefix disabled) adds" in done.stdout
