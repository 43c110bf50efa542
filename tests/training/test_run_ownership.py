"""A training run owns its output folder: an earlier run's checkpoints never outrank its own, --resume continues
the run it names, and a clean finish leaves a lock with nothing to take over."""

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import tiny
from mmprefix import PrefixConfig, add_prefix
from mmprefix.training import TrainConfig, TrainingInterrupted, checkpoints, train
from train_tiny import Rows, build, make_collate


def trainable(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def assert_same(a, b):
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)


def stopping_at(step, stop=signal.SIGTERM):
    """A loss function that sends ``stop`` to this process while step ``step`` runs, as a scheduler would."""
    calls = []

    def loss_fn(model, batch):
        calls.append(1)
        if len(calls) == step:
            os.kill(os.getpid(), stop)
        return model(**batch).loss

    return loss_fn


def steps_in(folder):
    return [checkpoints.step_of(p) for p in checkpoints.complete_checkpoints(folder)]


def config(folder, steps, **options):
    return TrainConfig(**{**dict(output_dir=str(folder), max_steps=steps, batch_size=4, save_every=2, log_every=1,
                                 learning_rate=1e-2, plot=False), **options})


def test_a_shorter_new_run_in_an_old_runs_folder_keeps_and_resumes_its_own_checkpoints(tmp_path, capsys):
    """Before: rotation kept the old run's steps 10 and 12 over the new run's 2 and 4, SIGTERM named step 12 and
    --resume 'continued' the old run (the 6-step run ended with the 12-step run's prefix)."""
    run = tmp_path / "run"
    reference = build(0.0)
    train(reference, Rows(), make_collate(False), config(tmp_path / "reference", 6))
    train(build(0.0), Rows(), make_collate(False), config(run, 12, learning_rate=3e-2))  # the earlier, longer run
    old = {p.name: (p / "trainable.safetensors").read_bytes() for p in checkpoints.complete_checkpoints(run / "checkpoints")}
    with pytest.raises(TrainingInterrupted, match=r"after step 3; checkpoint .*step-00000003 holds it") as stopped:
        train(build(0.0), Rows(), make_collate(False), config(run, 6), loss_fn=stopping_at(3))
    assert steps_in(run / "checkpoints") == [2, 3] and stopped.value.checkpoint.endswith("step-00000003")
    note = capsys.readouterr().err
    aside = next(run.glob(f"{checkpoints.SET_ASIDE}*"))
    assert f"held the checkpoints of an earlier run (steps 10, 12); moved them to {aside}" in note
    kept = {p.name: (p / "trainable.safetensors").read_bytes() for p in checkpoints.complete_checkpoints(aside / "checkpoints")}
    assert kept == old, "the earlier run's checkpoints are set aside whole, not deleted"
    resumed = build(0.0)
    train(resumed, Rows(), make_collate(False), config(run, 6, resume=True))
    assert_same(trainable(resumed), trainable(reference))


def test_resuming_before_an_unreadable_checkpoint_sets_it_aside(tmp_path):
    """With keep_checkpoints=1, the unreadable step 6 outranked what the resumed run wrote (steps 4 -> 5, 6...): a
    second SIGTERM then named step 6 and the next --resume found nothing whole."""
    run = tmp_path / "run"
    reference = build(0.0)
    train(reference, Rows(), make_collate(False), config(tmp_path / "reference", 8, keep_checkpoints=1))
    with pytest.raises(TrainingInterrupted):
        train(build(0.0), Rows(), make_collate(False), config(run, 8, keep_checkpoints=2), loss_fn=stopping_at(6))
    (run / "checkpoints" / "step-00000006" / "optimizer.json").write_text("{")
    with pytest.warns(UserWarning, match="step-00000006 cannot be read back"), \
            pytest.raises(TrainingInterrupted, match=r"after step 5; checkpoint .*step-00000005 holds it"):
        train(build(0.0), Rows(), make_collate(False), config(run, 8, keep_checkpoints=1, resume=True),
              loss_fn=stopping_at(1))
    assert steps_in(run / "checkpoints") == [5]
    assert [p.name for p in run.glob(f"{checkpoints.SET_ASIDE}*/checkpoints/*")] == ["step-00000006"]
    resumed = build(0.0)
    train(resumed, Rows(), make_collate(False), config(run, 8, keep_checkpoints=1, resume=True))
    assert_same(trainable(resumed), trainable(reference))


def test_a_run_that_finished_cleanly_leaves_no_lock_to_take_over(tmp_path):
    script = ("import sys; from mmprefix.training import lock; lock.claim(sys.argv[1]); "
              "print('claimed', flush=True)")
    first = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True, check=True)
    assert first.stdout == "claimed\n" and (tmp_path / ".lock").read_text() == ""
    second = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True, check=True)
    assert "taking over" not in second.stderr, second.stderr
    killed = subprocess.run([sys.executable, "-c", script + "; import os; os.kill(os.getpid(), 9)", str(tmp_path)],
                            capture_output=True, text=True)
    assert killed.returncode == -9 and (tmp_path / ".lock").read_text().startswith("process ")
    third = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True, check=True)
    assert "taking over" in third.stderr, "a killed holder is still named"


def test_an_empty_training_set_or_prefix_is_one_line_not_a_traceback_from_inside(tmp_path):
    """Before: the sampler's "num_samples should be a positive integer", autograd's "element 0 of tensors does not
    require grad"."""
    with pytest.raises(ValueError, match=r"the dataset has 0 rows, fewer than one batch of 4"):
        train(build(0.0), Rows(0), make_collate(False), config(tmp_path, 2))
    empty = add_prefix(tiny.gpt2(), PrefixConfig(num_virtual_tokens=0))
    with pytest.raises(ValueError, match="the model has no trainable parameters"):
        train(empty, Rows(), make_collate(False), config(tmp_path, 2))


@pytest.mark.slow  # four recipe runs in their own processes
def test_through_a_recipe_a_shorter_new_run_stopped_and_resumed_ends_with_its_own_prefix(tmp_path):
    from safetensors.torch import load_file

    recipe = [sys.executable, str(Path(__file__).resolve().parents[2] / "recipes" / "textgen.py"), "--save-every", "2",
              "train.log_every=1", "train.eval_every=0", "data.val.limit=4", "data.test.limit=8", "eval.meteor=false"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def run(folder, steps, *extra):
        return subprocess.run([*recipe, "--output-dir", str(folder), "--max-steps", str(steps), *extra],
                              capture_output=True, text=True, env=env)

    assert run(tmp_path / "reference", 20).returncode == 0
    assert run(tmp_path / "run", 40, "train.learning_rate=0.1").returncode == 0  # the earlier, longer run
    log = tmp_path / "run" / "log.jsonl"
    new = subprocess.Popen([*recipe, "--output-dir", str(tmp_path / "run"), "--max-steps", "20"], env=env,
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not (any(log.parent.glob("set-aside-*")) and log.is_file() and '"step": 2,' in log.read_text()):
        assert new.poll() is None and time.time() < deadline, "the new run ended before it could be stopped"
        time.sleep(0.01)
    new.send_signal(signal.SIGTERM)
    _, err = new.communicate(timeout=300)
    assert new.returncode == 128 + signal.SIGTERM, err[-2000:]
    step = int(re.search(r"after step (\d+); checkpoint \S+step-(\d+) holds it", err)[2])
    assert 2 <= step < 20 and "held the checkpoints of an earlier run" in err
    resumed = run(tmp_path / "run", 20, "--resume")
    assert resumed.returncode == 0 and f"resuming from {tmp_path / 'run' / 'checkpoints'}/step-{step:08d}" in resumed.stdout
    ours, reference = (load_file(tmp_path / folder / "prefix" / "prefix.safetensors") for folder in ("run", "reference"))
    assert ours.keys() == reference.keys() and all(torch.equal(ours[k], reference[k]) for k in ours)
