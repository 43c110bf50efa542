"""The frozen base sharded by FSDP2 over two gloo processes (torchrun, one thread each): every family's loss,
prefix gradients and generation against the unsharded model; a training run against one process; half the
base weights per process; exact resume after SIGKILL; a recipe launched as two nodes on loopback."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import tiny
from mmprefix import load_prefix
from mmprefix.training import checkpoints, train
from train_tiny import Rows, build, make_collate, tiny_config

HERE = Path(__file__).resolve().parents[1]  # the tests folder, with the helpers
ROOT = HERE.parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
# the accelerate config for FSDP that docs/guides/large-models.md shows
ACCELERATE = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ROOT / "examples" / "fsdp.yaml"),
              "--num_processes", "2"]
# A sharded run sums the same gradients in another order (per-process means, then their average); measured
# differences are ~2e-8 after 10 steps.
TOLERANCE = 1e-5


def final(folder, rank=0):
    return load_file(Path(folder) / f"final-rank{rank}.safetensors")


def assert_close(a, b, atol):
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=atol, msg=key)


def launch(command, **kwargs):
    result = subprocess.run(command, capture_output=True, text=True, env=ENV, **kwargs)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return result


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_every_family_sharded_gives_the_unsharded_loss_gradients_and_tokens(tmp_path):
    launch([*TORCHRUN, str(HERE / "fsdp_families.py"), str(tmp_path / "families.json")])
    for rank in (0, 1):
        results = json.loads((tmp_path / f"families.json.rank{rank}").read_text())
        assert len(results) == 12  # 9 families, 3 of them again with a memory prefix
        for family, r in results.items():
            assert r["loss"][0] == pytest.approx(r["loss"][1], rel=1e-6), family
            assert r["grad_difference"] <= 1e-5 * r["grad_scale"], family
            assert r["tokens"][0] == r["tokens"][1], family
            assert 0.45 <= r["local_fraction"] <= 0.55, (family, r["local_fraction"])


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two processes launched with the docs' accelerate config for FSDP (gradient checkpointing on), and the same
    run in this process unsharded: 10 steps of 2 micro-steps."""
    folder = tmp_path_factory.mktemp("fsdp")
    launch([*ACCELERATE, str(HERE / "train_tiny.py"), str(folder / "sharded"), "10", "--dropout", "0",
            "--accumulate", "2", "--checkpointing"])  # sharded because the config says FSDP
    one = build(0.0)
    train(one, Rows(), make_collate(False), tiny_config(str(folder / "one"), 10, accumulate=2))
    return folder, {n: p.detach() for n, p in one.prefixes.named_parameters()}


@pytest.mark.slow  # seconds of subprocesses or a JVM: the slow suite (CI runs it too)
def test_sharded_training_matches_one_process_with_half_the_base_per_process(runs):
    runs, one = runs
    rank0, rank1 = final(runs / "sharded", 0), final(runs / "sharded", 1)
    assert_close(rank0, rank1, atol=0)
    assert_close(rank0, one, atol=TOLERANCE)
    start = build(0.0).prefixes.state_dict()
    assert any((rank0[k] - start[k]).abs().max() > 1e-3 for k in rank0), "training moved the prefix"
    for rank in (0, 1):
        memory = json.loads((runs / "sharded" / f"memory-rank{rank}.json").read_text())
        assert memory["local"] <= 0.55 * memory["whole"], memory


@pytest.mark.slow  # seconds of subprocesses or a JVM: the slow suite (CI runs it too)
def test_sharded_training_saves_only_the_prefix(runs):
    runs, _ = runs
    saved = load_prefix(tiny.gpt2(), runs / "sharded" / "prefix")
    reference = final(runs / "sharded")
    assert_close({k: v for k, v in saved.prefixes.state_dict().items()}, reference, atol=0)
    latest = checkpoints.latest_checkpoint(runs / "sharded" / "checkpoints")
    trainable = checkpoints.read_part(latest, "trainable")
    assert sorted(trainable) == sorted(f"prefixes.{k}" for k in reference)
    assert checkpoints.read_part(latest, "state")["processes"] == 2
    meta = json.loads((runs / "sharded" / "prefix" / "prefix_config.json").read_text())
    assert meta["model"]["architecture"] == "GPT2LMHeadModel", "the model's own class, not FSDP's subclass"


@pytest.mark.slow
def test_a_sharded_run_killed_with_sigkill_and_resumed_ends_like_an_uninterrupted_run(runs, tmp_path):
    runs, _ = runs
    killed = tmp_path / "killed"
    command = [*TORCHRUN, str(HERE / "train_tiny.py"), str(killed), "10", "--dropout", "0", "--accumulate", "2",
               "--fsdp", "--checkpointing"]
    process = subprocess.Popen([*command, "--slow"], env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
    marker = killed / "checkpoints" / "step-00000004" / "complete"
    deadline = time.time() + 300
    while not marker.exists():
        assert process.poll() is None and time.time() < deadline, "the run ended before it could be killed"
        time.sleep(0.01)
    time.sleep(0.2)
    os.killpg(process.pid, signal.SIGKILL)  # torchrun and both workers
    process.wait()
    assert not (killed / "prefix").exists(), "the run was killed before the end"
    launch([*command, "--resume"])
    assert_close(final(killed), final(runs / "sharded"), atol=0)


@pytest.mark.slow
def test_a_recipe_launched_as_two_nodes_on_loopback_runs_to_the_end(tmp_path):
    """Two torchrun agents, one process each, meeting at a rendezvous on 127.0.0.1 as two machines would."""
    out = tmp_path / "run"
    port = free_port()
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
               "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", str(ROOT / "recipes" / "textgen.py"),
               "--output-dir", str(out), "--max-steps", "4", "train.fsdp=true", "train.batch_size=8",
               "train.eval_every=2", "train.save_every=2", "train.log_every=1", "data.train.limit=64",
               "data.val.limit=8", "data.test.limit=8", "eval.batch_size=8"]
    nodes = [subprocess.Popen(command, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for _ in range(2)]
    outputs = [node.communicate(timeout=600)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], "\n".join(o[-3000:] for o in outputs)
    assert sum("sharded across 2 processes" in o for o in outputs) == 1, "the main process says it sharded"
    metrics = json.loads((out / "metrics.json").read_text())
    assert {"zero_shot", "tuned"} <= set(metrics)
    latest = checkpoints.latest_checkpoint(out / "checkpoints")
    assert latest.name == "step-00000004" and (latest / "rng-rank1.json").is_file()
    assert checkpoints.read_part(latest, "state")["processes"] == 2
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "eval/Bleu_4" in r] == [2, 4], "evaluated while sharded"
    from mmprefix.models.loading import load_model

    model, _ = load_model("embedded:lm", "text")
    load_prefix(model, out / "prefix")


def test_deepspeed_is_refused_with_the_way_to_shard(tmp_path, monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")  # what accelerate launch --use_deepspeed sets
    with pytest.raises(ValueError, match="does not train under DeepSpeed.*examples/fsdp.yaml"):
        train(build(0.0), Rows(), make_collate(False), tiny_config(str(tmp_path), 2))
