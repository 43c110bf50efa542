"""The training engine: exact resume after SIGKILL, two processes, NaN stops, logs, best/last models."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import tiny
from mmprefix import PrefixConfig, add_prefix, load_prefix
from mmprefix.training import TrainConfig, TrainingError, TrainingInterrupted, checkpoints, train
from mmprefix.training import lock
from mmprefix.training.lock import FolderInUse
from train_tiny import Rows, build, make_collate

SCRIPT = str(Path(__file__).resolve().parents[1] / "train_tiny.py")


def final(folder, rank=0):
    return load_file(Path(folder) / f"final-rank{rank}.safetensors")


def assert_same(a, b, atol=0.0):
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=atol, msg=key)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """Where the 14-step run of train_tiny.py ends without interruption, per gradient accumulation."""
    runs = {}

    def run(accumulate):
        if accumulate not in runs:
            folder = tmp_path_factory.mktemp(f"full{accumulate}")
            subprocess.run([sys.executable, SCRIPT, str(folder), "14", "--accumulate", str(accumulate)], check=True,
                           capture_output=True)
            runs[accumulate] = final(folder)
        return runs[accumulate]

    return run


def logged_steps(folder):
    records = [json.loads(line) for line in (Path(folder) / "log.jsonl").read_text().splitlines()]
    return [r["step"] for r in records if "loss" in r]


def wait_for(condition, process, what):
    deadline = time.time() + 120
    while not condition():
        assert process.poll() is None and time.time() < deadline, f"the run ended before {what}"
        time.sleep(0.01)


@pytest.mark.slow  # seconds of subprocesses or a JVM: the slow suite (CI runs it too)
@pytest.mark.parametrize("accumulate", [1, 2])
def test_a_run_killed_with_sigkill_and_resumed_ends_like_an_uninterrupted_run(tmp_path, accumulate, uninterrupted):
    killed = tmp_path / "killed"
    process = subprocess.Popen([sys.executable, SCRIPT, str(killed), "14", "--slow", "--accumulate", str(accumulate)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    marker = killed / "checkpoints" / "step-00000008" / "complete"
    wait_for(marker.exists, process, "it could be killed")
    time.sleep(0.1)  # into the next steps, possibly mid-checkpoint
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (killed / "prefix").exists(), "the run was killed before the end"
    subprocess.run([sys.executable, SCRIPT, str(killed), "14", "--resume", "--accumulate", str(accumulate)],
                   check=True, capture_output=True)
    assert_same(final(killed), uninterrupted(accumulate))
    assert logged_steps(killed) == list(range(2, 15, 2)), "each step logged once, the resumed ones too"


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_stops_after_the_step_with_a_checkpoint_and_resume_continues_exactly(stop, tmp_path):
    config = dict(output_dir=str(tmp_path / "run"), max_steps=10, batch_size=4, log_every=1, learning_rate=1e-2,
                  plot=False)  # save_every=0: the signal's checkpoint is the only one
    reference = build(0.0)
    train(reference, Rows(), make_collate(False), TrainConfig(**dict(config, output_dir=str(tmp_path / "ref"))))
    steps = []

    def loss_fn(model, batch):
        steps.append(1)
        if len(steps) == 5:  # while step 5 runs, as a scheduler or a user would
            os.kill(os.getpid(), stop)
        return model(**batch).loss

    with pytest.raises(TrainingInterrupted, match=rf"{stop.name} stopped training after step 5; checkpoint "
                                                  r".*step-00000005 holds it") as err:
        train(build(0.0), Rows(), make_collate(False), TrainConfig(**config), loss_fn=loss_fn)
    assert err.value.signal_number == stop and signal.getsignal(stop) is not None
    assert [p.name for p in (tmp_path / "run" / "checkpoints").iterdir()] == ["step-00000005"]
    resumed = build(0.0)
    train(resumed, Rows(), make_collate(False), TrainConfig(**dict(config, resume=True)))
    assert_same(trainable(resumed), trainable(reference))
    assert logged_steps(tmp_path / "run") == list(range(1, 11))


@pytest.mark.slow
def test_sigterm_ends_the_process_cleanly_with_a_checkpoint(tmp_path, uninterrupted):
    run = tmp_path / "run"
    process = subprocess.Popen([sys.executable, SCRIPT, str(run), "14", "--slow"], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    wait_for(lambda: (run / "log.jsonl").is_file() and 6 in logged_steps(run), process, "the signal")
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGTERM, err[-2000:]  # what schedulers and shells expect
    assert "Traceback" not in err and "SIGTERM stopped training after step" in err and "--resume" in err
    step = int(re.search(r"after step (\d+)", err)[1])
    assert 6 <= step < 14 and (run / "checkpoints" / f"step-{step:08d}" / "complete").is_file()
    assert not (run / "prefix").exists(), "stopped, not finished"
    subprocess.run([sys.executable, SCRIPT, str(run), "14", "--resume"], check=True, capture_output=True)
    assert_same(final(run), uninterrupted(1))
    assert logged_steps(run) == list(range(2, 15, 2))


def test_a_second_run_on_the_folder_is_refused_and_a_dead_holder_is_taken_over(tmp_path, capsys):
    run = tmp_path / "run"
    ready_read, ready_write = os.pipe()
    holder = os.fork()
    if holder == 0:  # another process that owns the folder, as a training run does
        try:
            lock.claim(run)
            os.write(ready_write, b"1")
            time.sleep(120)
        finally:
            os._exit(0)
    try:
        assert os.read(ready_read, 1) == b"1"
        with pytest.raises(FolderInUse, match=rf"{run} is in use by process {holder} on "):
            train(build(0.0), Rows(), make_collate(False), TrainConfig(output_dir=str(run), max_steps=2, batch_size=4))
        assert not (run / "checkpoints").exists() and not (run / "log.jsonl").exists(), "nothing written"
    finally:
        os.kill(holder, signal.SIGKILL)
        os.waitpid(holder, 0)
    train(build(0.0), Rows(), make_collate(False), TrainConfig(output_dir=str(run), max_steps=2, batch_size=4,
                                                               plot=False))
    assert f"taking over {run / '.lock'} from process {holder}" in capsys.readouterr().err
    assert (run / ".lock").read_text() == "", "released cleanly: the next run takes it without a note"


def test_two_threads_cannot_train_into_one_folder(tmp_path):
    errors, started = [], threading.Event()

    def slow_collate(rows):
        started.set()
        time.sleep(0.05)
        return make_collate(False)(rows)

    first = threading.Thread(target=lambda: train(build(0.0), Rows(), slow_collate, TrainConfig(
        output_dir=str(tmp_path), max_steps=20, batch_size=4, plot=False)))
    first.start()
    started.wait(60)
    try:
        train(build(0.0), Rows(), make_collate(False), TrainConfig(output_dir=str(tmp_path), max_steps=2, batch_size=4))
    except FolderInUse as err:
        errors.append(str(err))
    first.join()
    assert len(errors) == 1 and "in use by another thread of this process" in errors[0]


def test_resume_compares_the_settings_with_the_checkpoints(tmp_path, capsys):
    config = dict(output_dir=str(tmp_path), max_steps=4, batch_size=4, save_every=2, learning_rate=1e-2, plot=False)
    train(build(0.0), Rows(), make_collate(False), TrainConfig(**config), settings={"model": "tiny", "data": "a"})
    resumed = dict(config, max_steps=6, save_every=3, log_every=1, resume=True)  # may change on resume
    with pytest.raises(TrainingError, match=r"train.learning_rate: checkpoint 0.01, now 0.02; data: checkpoint 'a', "
                                            r"now 'b'.*--resume-with-changes"):
        train(build(0.0), Rows(), make_collate(False), TrainConfig(**dict(resumed, learning_rate=2e-2)),
              settings={"model": "tiny", "data": "b"})
    train(build(0.0), Rows(), make_collate(False), TrainConfig(**resumed), settings={"model": "tiny", "data": "a"})
    assert "resuming from" in capsys.readouterr().out
    with pytest.warns(UserWarning, match="with changed settings: train.learning_rate: checkpoint 0.01, now 0.02"):
        train(build(0.0), Rows(), make_collate(False),
              TrainConfig(**dict(resumed, max_steps=8, learning_rate=2e-2, resume_with_changes=True)),
              settings={"model": "tiny", "data": "a"})


def test_a_damaged_latest_checkpoint_falls_back_to_the_one_before(tmp_path):
    config = dict(max_steps=8, batch_size=4, save_every=2, keep_checkpoints=3, log_every=1, learning_rate=1e-2,
                  plot=False)
    reference = build(0.0)
    train(reference, Rows(), make_collate(False), TrainConfig(output_dir=str(tmp_path / "ref"), **config))
    stopped = build(0.0)
    nan_gradient_at(stopped, step=7)  # a run that ends after step 6, checkpoints 2, 4, 6 on disk
    with pytest.raises(TrainingError):
        train(stopped, Rows(), make_collate(False), TrainConfig(output_dir=str(tmp_path / "run"), **config))
    weights = tmp_path / "run" / "checkpoints" / "step-00000006" / "trainable.safetensors"
    weights.write_bytes(weights.read_bytes()[:-64])
    with open(tmp_path / "run" / "log.jsonl", "a") as log:
        log.write('{"step": 7, "lo')  # a kill in the middle of appending a line (before: JSONDecodeError on resume)
    resumed = build(0.0)
    with pytest.warns(UserWarning, match="step-00000006 cannot be read back .*cannot be read.*trying the one before"):
        train(resumed, Rows(), make_collate(False), TrainConfig(output_dir=str(tmp_path / "run"), resume=True,
                                                                **config))
    assert_same(trainable(resumed), trainable(reference))
    assert logged_steps(tmp_path / "run") == list(range(1, 9)), "steps 5 and 6 logged once, though run twice"
    folders = sorted((tmp_path / "run" / "checkpoints").iterdir())
    assert [f.name for f in folders] == ["step-00000004", "step-00000006", "step-00000008"]
    (folders[0] / "state.json").write_text("{")  # every checkpoint damaged: an error, not a silent fresh start
    for folder in folders[1:]:
        (folder / "optimizer.json").unlink()
    with pytest.raises(checkpoints.DamagedCheckpoint, match="reads back whole"), pytest.warns(UserWarning):
        train(build(0.0), Rows(), make_collate(False), TrainConfig(output_dir=str(tmp_path / "run"), resume=True,
                                                                   **config))


def test_resume_on_an_empty_folder_says_it_starts_fresh(tmp_path, capsys):
    train(build(0.0), Rows(), make_collate(False), TrainConfig(output_dir=str(tmp_path), max_steps=2, batch_size=4,
                                                               resume=True, plot=False))
    assert f"--resume: no checkpoint in {tmp_path / 'checkpoints'}; starting fresh" in capsys.readouterr().out


@pytest.mark.slow  # seconds of subprocesses or a JVM: the slow suite (CI runs it too)
def test_two_processes_keep_ranks_identical_and_match_one_process(tmp_path):
    subprocess.run([sys.executable, SCRIPT, str(tmp_path / "one"), "10", "--dropout", "0"], check=True,
                   capture_output=True)
    result = launch_two(tmp_path / "two", 10, "--dropout", "0")
    assert result.returncode == 0, result.stderr[-3000:]
    rank0, rank1 = final(tmp_path / "two", 0), final(tmp_path / "two", 1)
    assert_same(rank0, rank1)
    assert_same(rank0, final(tmp_path / "one"), atol=1e-5)
    start = build(0.0).prefixes.state_dict()
    assert any((rank0[k] - start[k]).abs().max() > 1e-3 for k in rank0), "training moved the prefix"


def launch_two(*args, timeout=300):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    return subprocess.run([*launch, SCRIPT, *map(str, args)], capture_output=True, text=True, env=env,
                          timeout=timeout)


@pytest.mark.slow
def test_two_processes_resume_from_the_newest_checkpoint_both_can_read(tmp_path):
    assert launch_two(tmp_path / "whole", 12, "--dropout", "0").returncode == 0  # checkpoints of steps 8 and 12
    shutil.copytree(tmp_path / "whole", tmp_path / "run")
    for rank in (0, 1):
        (tmp_path / "run" / f"final-rank{rank}.safetensors").unlink()
    (tmp_path / "run" / "checkpoints" / "step-00000012" / "rng-rank1.json").write_text("{")  # rank 1's part only
    result = launch_two(tmp_path / "run", 12, "--dropout", "0", "--resume")  # before: rank 0 at 12, rank 1 at 8
    assert result.returncode == 0, result.stderr[-3000:]
    assert "step-00000012 cannot be read back (process 1:" in result.stderr
    assert result.stdout.count("resuming from") == 1 and "step-00000008 (step 8)" in result.stdout
    assert_same(final(tmp_path / "run", 0), final(tmp_path / "run", 1))
    assert_same(final(tmp_path / "run", 0), final(tmp_path / "whole", 0))


@pytest.mark.slow
def test_an_error_on_the_main_process_stops_the_other_with_its_reason(tmp_path):
    start = time.monotonic()
    result = launch_two(tmp_path / "run", 8, "--full-disk-on-main")
    assert result.returncode != 0
    assert "OSError: [Errno 28] No space left on device" in result.stderr
    assert ("process 0 failed while publishing the checkpoint of step 4 (OSError: [Errno 28] No space left on "
            "device); process 1 stops with it") in result.stderr
    assert time.monotonic() - start < 120, "the other process did not wait for a barrier's timeout"


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


def trainable(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


class StopHere(Exception):
    pass


def trained_until(steps, config):
    """The weights after ``steps`` steps of a run with ``config`` (stopped by an exception, before step
    ``steps + 1``'s update): the reference for a run stopped by the NaN guard at that step."""
    model = build(0.0)
    calls = []

    def loss_fn(model, batch):
        calls.append(1)
        if len(calls) > steps:
            raise StopHere
        return model(**batch).loss

    with pytest.raises(StopHere):
        train(model, Rows(), make_collate(False), config, loss_fn=loss_fn)
    return trainable(model)


def test_a_non_finite_loss_stops_before_the_update_and_names_the_last_good_checkpoint(tmp_path):
    reference = trained_until(6, TrainConfig(output_dir=str(tmp_path / "ref"), max_steps=20, batch_size=4,
                                             learning_rate=1e-2, plot=False))
    pm = build(0.0)
    calls = []

    def loss_fn(model, batch):
        calls.append(1)
        loss = model(**batch).loss
        return loss * float("nan") if len(calls) == 7 else loss

    config = TrainConfig(output_dir=str(tmp_path / "run"), max_steps=20, batch_size=4, save_every=3,
                         learning_rate=1e-2, plot=False)
    with pytest.raises(TrainingError, match=r"loss became \[nan\] at step 7; .* weights are those of step 6 and the "
                                            r"last good checkpoint is .*step-00000006"):
        train(pm, Rows(), make_collate(False), config, loss_fn=loss_fn)
    assert_same(trainable(pm), reference)  # what 6 steps give: step 7 never reached the weights


def nan_gradient_at(model, step):
    """From the ``step``-th backward on, the gradient of one prefix tensor is NaN (the loss stays finite), as
    when a backward pass overflows."""
    parameter = next(p for p in model.parameters() if p.requires_grad)
    calls = []

    def hook(grad):
        calls.append(1)
        return grad * float("nan") if len(calls) >= step else grad

    parameter.register_hook(hook)


def test_a_non_finite_gradient_never_reaches_the_weights_or_a_checkpoint(tmp_path):
    reference = trained_until(5, TrainConfig(output_dir=str(tmp_path / "ref"), max_steps=20, batch_size=4,
                                             learning_rate=1e-2, plot=False))
    pm = build(0.0)
    nan_gradient_at(pm, step=6)  # step 6 is also a checkpoint step
    config = TrainConfig(output_dir=str(tmp_path / "run"), max_steps=20, batch_size=4, save_every=2,
                         keep_checkpoints=2, learning_rate=1e-2, plot=False)
    with pytest.raises(TrainingError, match=r"gradient norm became \[nan\] at step 6; .* weights are those of step 5"
                                            r" and the last good checkpoint is .*step-00000004"):
        train(pm, Rows(), make_collate(False), config)
    assert_same(trainable(pm), reference)
    kept = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert kept == ["step-00000002", "step-00000004"], "no checkpoint of the bad step, the good ones kept"
    for name in kept:
        parts = checkpoints.read_checkpoint(tmp_path / "run" / "checkpoints" / name, trainable(build(0.0)),
                                            torch.optim.AdamW(trainable(build(0.0)).values()), rank=0)
        assert all(torch.isfinite(t).all() for t in parts["trainable"].values())


def test_the_message_states_the_real_save_every(tmp_path):
    pm = build(0.0)
    nan_gradient_at(pm, step=3)
    config = TrainConfig(output_dir=str(tmp_path), max_steps=20, batch_size=4, save_every=10, plot=False)
    with pytest.raises(TrainingError, match=r"no checkpoint was written yet \(save_every=10\)"):
        train(pm, Rows(), make_collate(False), config)


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
    assert (tmp_path / "lora" / "lora" / "adapter_model.safetensors").is_file()  # named for what was trained
    full = tiny.gpt2()
    train(full, Rows(), make_collate(False), TrainConfig(output_dir=str(tmp_path / "full"), max_steps=2, batch_size=4))
    assert (tmp_path / "full" / "model" / "config.json").is_file()


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
