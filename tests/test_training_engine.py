"""The training engine: exact resume after SIGKILL, two processes, NaN stops, logs, best/last models."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import tiny
from mmprefix import PrefixConfig, add_prefix, load_prefix
from mmprefix.training import TrainConfig, TrainingError, checkpoints, train
from train_tiny import Rows, build, make_collate

SCRIPT = str(Path(__file__).with_name("train_tiny.py"))


def final(folder, rank=0):
    return load_file(Path(folder) / f"final-rank{rank}.safetensors")


def assert_same(a, b, atol=0.0):
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=atol, msg=key)


@pytest.mark.parametrize("accumulate", [1, 2])
def test_a_run_killed_with_sigkill_and_resumed_ends_like_an_uninterrupted_run(tmp_path, accumulate):
    subprocess.run([sys.executable, SCRIPT, str(tmp_path / "full"), "14", "--accumulate", str(accumulate)],
                   check=True, capture_output=True)
    killed = tmp_path / "killed"
    process = subprocess.Popen([sys.executable, SCRIPT, str(killed), "14", "--slow", "--accumulate", str(accumulate)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    marker = killed / "checkpoints" / "step-00000008" / "complete"
    deadline = time.time() + 120
    while not marker.exists():
        assert process.poll() is None and time.time() < deadline, "the run ended before it could be killed"
        time.sleep(0.01)
    time.sleep(0.1)  # into the next steps, possibly mid-checkpoint
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (killed / "prefix").exists(), "the run was killed before the end"
    subprocess.run([sys.executable, SCRIPT, str(killed), "14", "--resume", "--accumulate", str(accumulate)],
                   check=True, capture_output=True)
    assert_same(final(killed), final(tmp_path / "full"))


def test_two_processes_keep_ranks_identical_and_match_one_process(tmp_path):
    subprocess.run([sys.executable, SCRIPT, str(tmp_path / "one"), "10", "--dropout", "0"], check=True,
                   capture_output=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    result = subprocess.run([*launch, SCRIPT, str(tmp_path / "two"), "10", "--dropout", "0"], capture_output=True,
                            text=True, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    rank0, rank1 = final(tmp_path / "two", 0), final(tmp_path / "two", 1)
    assert_same(rank0, rank1)
    assert_same(rank0, final(tmp_path / "one"), atol=1e-5)
    start = build(0.0).prefixes.state_dict()
    assert any((rank0[k] - start[k]).abs().max() > 1e-3 for k in rank0), "training moved the prefix"


def test_outputs_logs_best_and_last_model(tmp_path):
    pm = build(0.0)
    collate = make_collate(False)
    held_out = collate([Rows()[i] for i in range(8)])
    calls = []

    def evaluate(model):
        calls.append(model.training)
        return {"loss": model(**held_out).loss.item()}

    result = train(pm, Rows(), collate, TrainConfig(output_dir=str(tmp_path), max_steps=12, batch_size=4,
                                                     learning_rate=2e-2, eval_every=4, log_every=3,
                                                     metric="loss", greater_is_better=False), evaluate=evaluate)
    assert calls == [False, False, False], "evaluated in eval mode at steps 4, 8 and 12"
    records = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [3, 6, 9, 12]
    assert [r["step"] for r in records if "eval/loss" in r] == [4, 8, 12]
    assert all(r["samples_per_second"] > 0 and r["lr"] >= 0 for r in records if "loss" in r)
    assert (tmp_path / "curves.png").stat().st_size > 1000
    best_step = min((r for r in records if "eval/loss" in r), key=lambda r: r["eval/loss"])["step"]
    assert result["best"]["step"] == best_step
    loaded = load_prefix(tiny.gpt2(), tmp_path / "prefix")
    with torch.no_grad():
        torch.testing.assert_close(loaded(**held_out).logits, pm(**held_out).logits, rtol=0, atol=0)
    assert (tmp_path / "best" / "prefix.safetensors").is_file()


def test_a_non_finite_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
    pm = build(0.0)
    calls = []

    def loss_fn(model, batch):
        calls.append(1)
        loss = model(**batch).loss
        return loss * float("nan") if len(calls) == 7 else loss

    config = TrainConfig(output_dir=str(tmp_path), max_steps=20, batch_size=4, save_every=3, learning_rate=1e-2)
    with pytest.raises(TrainingError, match=r"at step 7; training stopped and the last good checkpoint is .*step-00000006"):
        train(pm, Rows(), make_collate(False), config, loss_fn=loss_fn)
    assert torch.isfinite(torch.cat([p.flatten() for p in pm.prefixes.parameters()])).all()


def test_same_seed_same_result_and_bf16_and_tensorboard(tmp_path):
    results = []
    for name in ("a", "b"):
        pm = build(0.1)
        train(pm, Rows(), make_collate(False), TrainConfig(output_dir=str(tmp_path / name), max_steps=6, batch_size=4,
                                                           seed=3, plot=False))
        results.append({n: p.detach().clone() for n, p in pm.prefixes.named_parameters()})
    assert_same(*results)
    pm = build(0.0)
    train(pm, Rows(), make_collate(False), TrainConfig(output_dir=str(tmp_path / "bf16"), max_steps=4, batch_size=4,
                                                       mixed_precision="bf16", trackers=["tensorboard"], plot=False))
    assert list((tmp_path / "bf16").rglob("events.out.tfevents*")), "tensorboard wrote its events"
    losses = [json.loads(line)["loss"] for line in (tmp_path / "bf16" / "log.jsonl").read_text().splitlines()]
    assert all(torch.isfinite(torch.tensor(losses)))


def test_trains_lora_and_full_models_too(tmp_path):
    from peft import LoraConfig, get_peft_model

    lora = get_peft_model(tiny.gpt2(), LoraConfig(target_modules=["c_attn"], r=2, fan_in_fan_out=True))
    train(lora, Rows(), make_collate(False), TrainConfig(output_dir=str(tmp_path / "lora"), max_steps=2, batch_size=4))
    assert (tmp_path / "lora" / "prefix" / "adapter_model.safetensors").is_file()
    full = tiny.gpt2()
    train(full, Rows(), make_collate(False), TrainConfig(output_dir=str(tmp_path / "full"), max_steps=2, batch_size=4))
    assert (tmp_path / "full" / "prefix" / "config.json").is_file()


def test_bad_settings_are_refused(tmp_path):
    with pytest.raises(ValueError, match="mixed_precision"):
        TrainConfig(output_dir=str(tmp_path), mixed_precision="fp8")
    frozen = tiny.gpt2().requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        train(frozen, Rows(), make_collate(False), TrainConfig(output_dir=str(tmp_path)))
    with pytest.raises(ValueError, match="fewer than one batch"):
        train(build(0.0), Rows(3), make_collate(False), TrainConfig(output_dir=str(tmp_path), batch_size=4))
    shutil.rmtree(tmp_path, ignore_errors=True)


# -- checkpoints are validated before anything is applied -----------------------------------------------------------


@pytest.fixture(scope="module")
def one_checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    train(build(0.0), Rows(), make_collate(False), TrainConfig(output_dir=str(out), max_steps=2, batch_size=4,
                                                               save_every=2, plot=False))
    return out / "checkpoints" / "step-00000002"


def damaged_copy(one_checkpoint, tmp_path, damage):
    path = tmp_path / "step-00000002"
    shutil.copytree(one_checkpoint, path)
    damage(path)
    return path


def read_into(path, model):
    parameters = {n: p for n, p in model.named_parameters() if p.requires_grad}
    return checkpoints.read_checkpoint(path, parameters, torch.optim.AdamW(parameters.values()), rank=0)


def nan_in(name):
    def damage(path):
        tensors = load_file(path / f"{name}.safetensors")
        next(t for t in tensors.values() if t.is_floating_point()).view(-1)[0] = float("nan")
        save_file(tensors, path / f"{name}.safetensors")
    return damage


@pytest.mark.parametrize("damage, words", [
    (lambda p: (p / "trainable.safetensors").write_bytes((p / "trainable.safetensors").read_bytes()[:-50]),
     "trainable.safetensors cannot be read"),
    (nan_in("trainable"), "trainable.safetensors: tensor"),
    (nan_in("optimizer"), "optimizer.safetensors: tensor"),
    (lambda p: (p / "state.json").write_text('{"__dict__": [['), "state.json is not valid JSON"),
    (lambda p: (p / "state.json").write_bytes(b"\xff"), "state.json is not UTF-8"),
    (lambda p: (p / "state.json").write_text((p / "state.json").read_text().replace('["step", 2]', '["step", "x"]')),
     "state.json: step must be an integer"),
    (lambda p: (p / "optimizer.json").unlink(), "optimizer.json is missing"),
    (lambda p: (p / "optimizer.json").write_text('{"__tensor__": "nowhere"}'), "refers to tensor 'nowhere'"),
    (lambda p: (p / "rng-rank0.json").write_text('{"__dict__": []}'), "rng-rank0.json does not hold the random states"),
], ids=["cut-short", "nan-weights", "nan-optimizer", "bad-json", "not-utf8", "wrong-type", "missing-part",
        "dangling-tensor", "bad-rng"])
def test_a_damaged_checkpoint_is_a_value_error_naming_the_file(damage, words, one_checkpoint, tmp_path):
    path = damaged_copy(one_checkpoint, tmp_path, damage)
    with pytest.raises(ValueError) as err:
        read_into(path, build(0.0))
    assert words in str(err.value) and str(path) in str(err.value) and "\n" not in str(err.value)


def test_a_checkpoint_of_another_prefix_length_is_refused_before_anything_is_loaded(one_checkpoint, tmp_path):
    path = damaged_copy(one_checkpoint, tmp_path, lambda p: None)
    other = add_prefix(tiny.gpt2(), PrefixConfig(num_virtual_tokens=6))
    with pytest.raises(ValueError, match=r"has shape \(4, 4, 8\), this model's is \(4, 6, 8\)"):
        read_into(path, other)
    before = {n: p.detach().clone() for n, p in other.named_parameters()}
    shutil.copytree(path, tmp_path / "run" / "checkpoints" / path.name)
    with pytest.raises(ValueError, match="another prefix length"):
        train(other, Rows(), make_collate(False), TrainConfig(output_dir=str(tmp_path / "run"), max_steps=4,
                                                              batch_size=4, resume=True, plot=False))
    assert all(torch.equal(before[n], p) for n, p in other.named_parameters()), "nothing was applied"
