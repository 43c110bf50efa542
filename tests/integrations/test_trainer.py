"""transformers' Trainer with a prefix model and default arguments: the real Trainer class on tiny models.

What Trainer keeps, saves, loads and resumes is checked against independent references: the wrapped model's
own forward signature, the folder `save_prefix` writes, the model's own loss and logits on the same batch, each
row run alone, and an uninterrupted run (a run killed by SIGKILL in a child process must end where it ends)."""

import copy
import inspect
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from transformers import Trainer, TrainerCallback, TrainingArguments, default_data_collator

import tiny
from kills import kill_outcomes

from mmprefix import PrefixConfig, add_prefix, load_prefix
from mmprefix.core import saving
from mmprefix.embedded import load_backbone
from mmprefix.integrations import hf_trainer

ROWS, LENGTH = 16, 8


def token_rows(rows=ROWS, seed=2, extra=True):
    """Token ids and labels for a vocabulary of 100 (the last two positions padding, not scored), and columns
    the base model does not take."""
    ids = tiny.tokens(rows, LENGTH, seed=seed)
    mask = torch.ones_like(ids)
    mask[::2, -2:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    columns = {"input_ids": ids.tolist(), "attention_mask": mask.tolist(), "labels": labels.tolist()}
    if extra:
        columns.update(length=mask.sum(1).tolist(), text=[f"row {i}" for i in range(rows)])
    return Dataset.from_dict(columns)


def gpt2_prefix_model(prefix_seed=0, **config):
    """A tiny GPT-2 (dropout 0.1: a resumed run matches only if the random state is restored) with a prefix
    drawn with ``prefix_seed``."""
    model = tiny.gpt2().train()
    torch.manual_seed(prefix_seed)
    return add_prefix(model, PrefixConfig(num_virtual_tokens=config.pop("p", 4), **config))


def prefix_tensors(model, name="default"):
    return {k: v.clone() for k, v in model.prefixes[name].tensors().items()}


def same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def arguments(out, **changes):
    return TrainingArguments(out, **{"per_device_train_batch_size": 4, "learning_rate": 0.05, "seed": 3, **changes})


def test_default_arguments_keep_the_base_models_columns_and_train_only_the_prefix(tmp_path):
    base = tiny.gpt2()
    frozen = copy.deepcopy(base.state_dict())
    model = add_prefix(base, PrefixConfig(num_virtual_tokens=4))
    before = prefix_tensors(model)
    parameters = inspect.signature(model.forward).parameters
    assert list(parameters) == [*[p for p in inspect.signature(base.forward).parameters if p != "kwargs"], "prefix", "kwargs"]
    trainer = Trainer(model=model, args=TrainingArguments(tmp_path / "out"), train_dataset=token_rows())
    batch = next(iter(trainer.get_train_dataloader()))
    assert set(batch) == {"input_ids", "attention_mask", "labels"}, "columns the base takes, the others dropped"
    trainer.train()
    assert not same(before, prefix_tensors(model))
    assert all(torch.equal(frozen[k], v) for k, v in base.state_dict().items())


def test_checkpoints_and_save_model_write_the_prefix_folder_that_load_prefix_reads(tmp_path):
    base, tokenizer = load_backbone("lm")
    model = add_prefix(base, PrefixConfig(num_virtual_tokens=4))
    rows = tokenizer([f"describe: size=small color={c} shape=circle => a small {c} circle" for c in
                      ("red", "blue", "green", "orange")] * 2)
    data = Dataset.from_dict({**rows, "labels": rows["input_ids"]})
    out = tmp_path / "out"
    trainer = Trainer(model=model, args=arguments(out, max_steps=4, save_steps=2), train_dataset=data,
                      processing_class=tokenizer)
    trainer.train()
    trainer.save_model()
    direct = tmp_path / "direct"
    model.save_prefix(direct, keep_reparam=True)
    base_bytes = sum(p.numel() * p.element_size() for p in base.parameters())
    probe = tokenizer(["describe: size=large color=red shape=square =>"], return_tensors="pt")
    expected = model(**probe).logits
    for folder in (out, out / "checkpoint-2", out / "checkpoint-4"):
        weights = [p.name for p in folder.iterdir() if p.suffix == ".safetensors"]
        assert weights == ["prefix.safetensors"], f"{folder}: the prefix alone, not the base ({weights})"
        assert (folder / "prefix.safetensors").stat().st_size < 0.01 * base_bytes
        logits = load_prefix(load_backbone("lm")[0], folder)(**probe).logits
        assert torch.equal(logits, expected) == (folder.name != "checkpoint-2"), folder
    meta, tensors = saving.read_prefix(out)
    direct_meta, direct_tensors = saving.read_prefix(direct)
    assert meta == direct_meta and same(tensors, direct_tensors), "exactly the folder save_prefix writes"
    assert not same(saving.read_prefix(out / "checkpoint-2")[1], tensors), "each checkpoint its own prefix"


def test_every_prefix_of_the_model_is_saved_and_restored(tmp_path):
    model = gpt2_prefix_model()
    model.add_prefix("other", PrefixConfig(num_virtual_tokens=2))
    trainer = Trainer(model=model, args=arguments(tmp_path / "out", max_steps=1), train_dataset=token_rows())
    trainer.save_model()
    assert saving.read_prefix(tmp_path / "out")[0].name == "default"
    assert saving.read_prefix(tmp_path / "out" / "other")[0].name == "other", "the others in subfolders"
    saved = {name: prefix_tensors(model, name) for name in model.prefixes}
    with torch.no_grad():
        for parameter in model.prefixes.parameters():
            parameter.add_(1.0)
    hf_trainer.load_prefixes(model, tmp_path / "out")
    assert all(same(saved[name], prefix_tensors(model, name)) for name in model.prefixes)


class StopAt(TrainerCallback):
    """Ends training after ``step`` (its checkpoint written), as a kill after that checkpoint would."""

    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


@pytest.mark.parametrize("options", [{}, {"reparam": "mlp", "reparam_hidden": 16}], ids=["flat", "reparam"])
def test_resuming_from_a_checkpoint_ends_where_the_uninterrupted_run_ends(options, tmp_path):
    args = dict(max_steps=6, save_steps=2, lr_scheduler_type="linear", warmup_steps=1)
    whole = gpt2_prefix_model(**options)
    Trainer(model=whole, args=arguments(tmp_path / "whole", **args), train_dataset=token_rows()).train()
    stopped = gpt2_prefix_model(**options)
    Trainer(model=stopped, args=arguments(tmp_path / "cut", **args), train_dataset=token_rows(),
            callbacks=[StopAt(4)]).train()
    resumed = gpt2_prefix_model(prefix_seed=1, **options)  # another start: only the checkpoint can make it equal
    assert not same(prefix_tensors(resumed), prefix_tensors(stopped))
    Trainer(model=resumed, args=arguments(tmp_path / "cut", **args), train_dataset=token_rows()).train(
        resume_from_checkpoint=True)
    assert same(prefix_tensors(resumed), prefix_tensors(whole))
    assert not same(prefix_tensors(stopped), prefix_tensors(whole))


def test_resuming_with_another_prefix_config_or_from_a_half_saved_checkpoint_is_refused(tmp_path):
    out = tmp_path / "out"
    Trainer(model=gpt2_prefix_model(), args=arguments(out, max_steps=2, save_steps=2), train_dataset=token_rows()).train()
    longer = Trainer(model=gpt2_prefix_model(p=8), args=arguments(out, max_steps=4), train_dataset=token_rows())
    with pytest.raises(ValueError, match=r"num_virtual_tokens': \(4, 8\).*resume with the PrefixConfig"):
        longer.train(resume_from_checkpoint=True)
    shutil.copytree(out / "checkpoint-2", out / "checkpoint-3")
    (out / "checkpoint-3" / "trainer_state.json").unlink()  # killed after the prefix, before Trainer's state
    same_config = Trainer(model=gpt2_prefix_model(), args=arguments(out, max_steps=4), train_dataset=token_rows())
    with pytest.raises(ValueError, match="checkpoint-3 is not a complete checkpoint.*resume from the checkpoint before"):
        same_config.train(resume_from_checkpoint=True)


def test_save_model_killed_at_any_file_operation_leaves_the_old_or_the_new_prefix(tmp_path):
    model = gpt2_prefix_model()
    trainer = Trainer(model=model, args=arguments(tmp_path / "out", max_steps=1), train_dataset=token_rows())
    store = model.prefixes["default"]
    old = prefix_tensors(model)
    new = {k: v + 1.0 for k, v in old.items()}
    folder = tmp_path / "saved"

    def prepare():
        store.load_tensors(old)
        trainer.save_model(folder)
        store.load_tensors(new)

    operations, outcomes = kill_outcomes(folder, prepare, lambda: trainer.save_model(folder), [old, new])
    assert operations >= 8
    assert None not in outcomes and outcomes[0] == 0 and 1 in outcomes, outcomes


def test_load_best_model_at_end_loads_the_best_prefix(tmp_path):
    model = gpt2_prefix_model()
    out = tmp_path / "out"
    args = arguments(out, max_steps=4, eval_strategy="steps", eval_steps=1, save_steps=1, load_best_model_at_end=True,
                     metric_for_best_model="loss", greater_is_better=True)  # the worst loss is "best": not the last
    trainer = Trainer(model=model, args=args, train_dataset=token_rows(), eval_dataset=token_rows(seed=4))
    trainer.train()
    best = trainer.state.best_model_checkpoint
    assert Path(best).name != "checkpoint-4"
    assert same(prefix_tensors(model), saving.read_prefix(best)[1])
    assert not same(prefix_tensors(model), saving.read_prefix(out / "checkpoint-4")[1])


def test_evaluate_and_predict_give_the_models_own_loss_and_logits(tmp_path):
    model = gpt2_prefix_model().eval()
    data = token_rows(seed=5)
    trainer = Trainer(model=model, args=arguments(tmp_path / "out", per_device_eval_batch_size=ROWS), eval_dataset=data)
    batch = {k: torch.tensor(data[k]) for k in ("input_ids", "attention_mask", "labels")}
    with torch.no_grad():
        own = model(**batch)
    targets = batch["labels"][:, 1:]
    nll = -own.logits[:, :-1].log_softmax(-1).gather(-1, targets.clamp(min=0)[..., None])[..., 0]
    # Trainer divides the batch's summed loss by its label count: shifted for causal LMs it recognises, else all
    counted = targets if trainer._loss_shifts_labels else batch["labels"]
    expected = nll[targets != -100].sum() / (counted != -100).sum()
    assert trainer.evaluate()["eval_loss"] == pytest.approx(expected.item(), rel=1e-5)
    predicted = trainer.predict(data)
    assert torch.allclose(torch.as_tensor(predicted.predictions), own.logits, atol=1e-6)
    assert torch.equal(torch.as_tensor(predicted.label_ids), batch["labels"])


def routed_collate(rows):
    """The rows' tensors, and their ``prefix`` column as the per-row routing list."""
    batch = default_data_collator([{k: v for k, v in row.items() if k != "prefix"} for row in rows])
    batch["prefix"] = [row["prefix"] for row in rows]
    return batch


def two_prefix_model():
    model = gpt2_prefix_model()
    model.add_prefix("other", PrefixConfig(num_virtual_tokens=2))
    return model


def test_a_prefix_column_routes_each_row_in_evaluation(tmp_path):
    model = two_prefix_model().eval()
    data = token_rows(8, seed=6).add_column("prefix", ["default", "other", None, "other"] * 2)
    trainer = Trainer(model=model, args=arguments(tmp_path / "out", per_device_eval_batch_size=8),
                      data_collator=routed_collate)
    logits = torch.as_tensor(trainer.predict(data).predictions)
    for row in range(8):
        alone = {k: torch.tensor(data[k][row : row + 1]) for k in ("input_ids", "attention_mask")}
        with torch.no_grad():
            expected = model(**alone, prefix=data["prefix"][row]).logits[0]
        assert torch.allclose(logits[row], expected, atol=1e-5), row


def test_gradient_checkpointing_trains_routed_prefixes_as_without_it(tmp_path):
    data = token_rows(seed=7).add_column("prefix", ["default", "other"] * (ROWS // 2))
    trained = []
    for checkpointing in (False, True):
        model = two_prefix_model()
        args = arguments(tmp_path / str(checkpointing), max_steps=3, gradient_checkpointing=checkpointing)
        Trainer(model=model, args=args, train_dataset=data, data_collator=routed_collate).train()
        trained.append({name: prefix_tensors(model, name) for name in model.prefixes})
    for name in ("default", "other"):
        for key, value in trained[0][name].items():
            assert torch.allclose(value, trained[1][name][key], atol=1e-5), (name, key)


def test_bf16_trains_the_float32_prefix_and_a_cpu_without_bf16_is_told_so(tmp_path, monkeypatch):
    model = gpt2_prefix_model()
    before = prefix_tensors(model)
    trainer = Trainer(model=model, args=arguments(tmp_path / "out", max_steps=2, bf16=True, use_cpu=True),
                      train_dataset=token_rows())
    trainer.train()
    assert all(p.dtype == torch.float32 for p in model.prefixes.parameters())
    assert not same(before, prefix_tensors(model)) and all(v.isfinite().all() for v in prefix_tensors(model).values())
    monkeypatch.setattr(hf_trainer, "is_torch_bf16_available_on_device", lambda device: False)
    with pytest.raises(ValueError, match="this CPU cannot compute in bfloat16.*bf16=False"):
        Trainer(model=gpt2_prefix_model(), args=arguments(tmp_path / "b", bf16=True, use_cpu=True),
                train_dataset=token_rows())


def test_other_models_are_saved_as_before(tmp_path):
    add_prefix(tiny.gpt2())  # Trainer learns about prefix models when the first one is built
    assert Trainer._save.__mmprefix__
    trainer = Trainer(model=tiny.gpt2(), args=arguments(tmp_path / "out", max_steps=1), train_dataset=token_rows())
    trainer.train()
    trainer.save_model()
    assert (tmp_path / "out" / "model.safetensors").is_file() and not (tmp_path / "out" / "prefix.safetensors").exists()


def test_trainer_and_trl_imported_after_the_prefix_model_learn_about_it():
    code = """
import sys; sys.path.insert(0, "tests")
import tiny
from mmprefix import add_prefix
add_prefix(tiny.gpt2())
assert "transformers.trainer" not in sys.modules and "trl" not in sys.modules
from transformers import Trainer
from trl import SFTTrainer
import trl.trainer.sft_trainer as sft
assert Trainer._save.__mmprefix__ and Trainer._load_from_checkpoint.__mmprefix__ and Trainer._load_best_model.__mmprefix__
assert sft.add_fused_lm_head.__mmprefix__
"""
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(root)})
    assert done.returncode == 0, done.stderr[-2000:]


KILLED_RUN = """
import os, signal, sys
sys.path[:0] = ["tests", "tests/integrations"]
from kills import kill_at
from test_trainer import *

out, how = Path(sys.argv[1]), sys.argv[2]


class Kill(TrainerCallback):
    def on_step_begin(self, args, state, control, **kwargs):
        if how == "mid-run" and state.global_step == 5:
            os.kill(os.getpid(), signal.SIGKILL)


if how == "mid-save":
    kill_at(out / "checkpoint-4", 3)  # the third file operation of that checkpoint: its prefix is being written
Trainer(model=gpt2_prefix_model(), args=arguments(out, max_steps=6, save_steps=2), train_dataset=token_rows(),
        callbacks=[Kill()]).train()
"""


@pytest.mark.slow  # two processes start torch and transformers
@pytest.mark.parametrize("how", ["mid-run", "mid-save"])
def test_a_run_killed_by_sigkill_resumes_to_the_uninterrupted_runs_prefix(how, tmp_path):
    whole = gpt2_prefix_model()
    Trainer(model=whole, args=arguments(tmp_path / "whole", max_steps=6, save_steps=2), train_dataset=token_rows()).train()
    out, root = tmp_path / "killed", Path(__file__).resolve().parents[2]
    killed = subprocess.run([sys.executable, "-c", KILLED_RUN, str(out), how], cwd=root, capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(root)})
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    resumed = gpt2_prefix_model(prefix_seed=1)
    trainer = Trainer(model=resumed, args=arguments(out, max_steps=6, save_steps=2), train_dataset=token_rows())
    if how == "mid-save":
        assert not (out / "checkpoint-4" / "trainer_state.json").exists()
        with pytest.raises(ValueError, match="checkpoint-4 is not a complete checkpoint"):
            trainer.train(resume_from_checkpoint=True)
        trainer.train(resume_from_checkpoint=str(out / "checkpoint-2"))
    else:
        trainer.train(resume_from_checkpoint=True)
    assert same(prefix_tensors(resumed), prefix_tensors(whole))
