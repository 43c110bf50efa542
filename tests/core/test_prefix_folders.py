"""Prefix folders survive kills, full disks and concurrent savers: a folder always loads as the old or the new
prefix, and no temporary file outlives the next save. Kills are real SIGKILLs of forked children, at every file
operation of a save and at random moments; full disks are a real tmpfs (and, everywhere, a patched writer)."""

import errno
import json
import os
import random
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import tiny
from kills import kill_outcomes, which
from mmprefix import PrefixConfig, add_prefix, load_prefix
from mmprefix.core import saving
from mmprefix.core.files import _HOST, UNTAGGED_AGE

P = 10_000  # keys and values of ~5 MB: a save takes long enough for a random kill to land inside it


def prefix_model(seed, p=P):
    model = tiny.gpt2()  # seeds the global generator itself
    torch.manual_seed(seed)
    return add_prefix(model, PrefixConfig(num_virtual_tokens=p, init_std=1.0))


@pytest.fixture(scope="module")
def two():
    """Two prefixes for the same model, with their tensors as saved."""
    models = [prefix_model(1), prefix_model(2)]
    tensors = [m.prefixes["default"].tensors() for m in models]
    assert not torch.equal(tensors[0]["transformer.h.0.attn.key"], tensors[1]["transformer.h.0.attn.key"])
    return models, tensors


def write_format_1(folder, tensors, meta):
    """A folder as mmprefix's format 1 wrote it: tensors without metadata, then the JSON with their checksum."""
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, folder / saving.WEIGHTS_NAME, metadata={"format": "mmprefix"})
    meta = {**meta, "format_version": 1, "weights_sha256": saving._file_sha256(folder / saving.WEIGHTS_NAME)}
    meta.pop("tensors_sha256", None)
    (folder / saving.CONFIG_NAME).write_text(json.dumps(meta))


def metadata(model, tmp_path):
    model.save_prefix(tmp_path / "meta")
    return json.loads((tmp_path / "meta" / saving.CONFIG_NAME).read_text())


def temporaries(folder):
    """Temporary files: ours (``.<target>....tmp``) and safetensors' own (``.tmpXXXXXX``)."""
    return sorted(p.name for p in Path(folder).iterdir() if p.name.endswith(".tmp") or p.name.startswith(".tmp"))


@pytest.mark.parametrize("start", ["format 2", "format 1"])
def test_a_save_killed_before_any_file_operation_leaves_the_old_or_the_new_prefix(start, tmp_path):
    old, new = prefix_model(1, p=4), prefix_model(2, p=4)  # kill points are exact: small prefixes will do
    old_tensors, new_tensors = old.prefixes["default"].tensors(), new.prefixes["default"].tensors()
    folder = tmp_path / "prefix"
    meta = metadata(old, tmp_path)

    def prepare():
        if start == "format 1":
            write_format_1(folder, old_tensors, meta)
        else:
            old.save_prefix(folder)

    def after_each():
        new.save_prefix(tmp_path / "elsewhere")  # unrelated
        old.save_prefix(folder)  # the next save into the folder ...
        assert temporaries(folder) == []  # ... removes what the killed one left

    # the file operations one save makes are counted in a child (audit hooks cannot be removed)
    operations, outcomes = kill_outcomes(folder, prepare, lambda: new.save_prefix(folder), [old_tensors, new_tensors],
                                         after_each)
    assert operations >= 8, "lock, temporary file, rename, JSON removal, JSON temporary, rename, ..."
    assert None not in outcomes, outcomes
    assert outcomes[0] == 0 and outcomes[-1] == 1, "killed first: old prefix; killed last: the new one"
    load_prefix(tiny.gpt2(), folder)


def kill_randomly(folder, two, kills, seed):
    """A child saves the two prefixes into ``folder`` in turns, again and again; SIGKILL it at random moments.
    Every time the folder must load as one of the two, and the next save leaves no temporary file."""
    (first, second), candidates = two
    rng = random.Random(seed)
    leaked = 0
    first.save_prefix(folder)
    for _ in range(kills):
        pid = os.fork()
        if pid == 0:
            try:
                while True:
                    second.save_prefix(folder)
                    first.save_prefix(folder)
            finally:
                os._exit(1)
        threading.Event().wait(rng.uniform(0.0, 0.2))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        assert which(folder, candidates) is not None
        leaked += len(temporaries(folder))
        first.save_prefix(folder)
        assert temporaries(folder) == []
    return leaked


def test_random_kills_during_saves_never_leave_a_broken_folder(two, tmp_path):
    leaked = kill_randomly(tmp_path / "prefix", two, kills=12, seed=0)  # ~40% of kills land mid-write
    assert leaked >= 1, "some kills landed mid-write (and their temporary files were cleaned up)"


@pytest.mark.slow
def test_many_random_kills_during_saves(two, tmp_path):
    kill_randomly(tmp_path / "prefix", two, kills=300, seed=1)


def test_a_temporary_file_of_a_live_writer_is_left_alone(two, tmp_path):
    (old, _), _ = two
    folder = tmp_path / "prefix"
    old.save_prefix(folder)
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        host = _HOST
        live = folder / f".prefix.safetensors.{host}-{sleeper.pid}.abcd1234.tmp"
        dead = folder / f".prefix.safetensors.{host}-{2**22 + 17}.abcd1234.tmp"  # above Linux's pid_max default
        untagged_old, untagged_new = folder / ".prefix_config.json.k3j4h5g6.tmp", folder / ".prefix_config.json.a1b2c3d4.tmp"
        other = folder / ".notes.txt.zzzz9999.tmp"
        for path in (live, dead, untagged_old, untagged_new, other):
            path.write_bytes(b"half a file")
        os.utime(untagged_old, (0, os.path.getmtime(untagged_old) - UNTAGGED_AGE - 10))
        old.save_prefix(folder)
        assert temporaries(folder) == sorted(p.name for p in (live, untagged_new, other))
    finally:
        sleeper.kill()
        sleeper.wait()


def test_two_processes_saving_into_one_folder_leave_a_consistent_folder(two, tmp_path):
    (first, second), candidates = two
    folder = tmp_path / "prefix"
    first.save_prefix(folder)
    for _ in range(3):
        pids = []
        for model in (first, second):
            pid = os.fork()
            if pid == 0:
                try:
                    for _ in range(3):
                        model.save_prefix(folder)
                finally:
                    os._exit(0)
            pids.append(pid)
        assert all(os.waitpid(pid, 0)[1] == 0 for pid in pids)
        index = which(folder, candidates)
        described = json.loads((folder / saving.CONFIG_NAME).read_text())
        header = json.loads(saving.safetensors_header(folder / saving.WEIGHTS_NAME)[0][saving.METADATA_KEY])
        assert index is not None and described == header, "the JSON copy describes the weights beside it"
        assert temporaries(folder) == []


# -- a full disk ------------------------------------------------------------------------------------------------


@pytest.fixture
def tiny_disk(tmp_path):
    """A 32 MiB tmpfs (needs root and the mount capability; the patched-writer test below runs everywhere)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=32m", "tmpfs", str(mount)], capture_output=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=True)


def fill(disk, leave):
    """Fill ``disk`` up to ``leave`` free bytes."""
    stats = os.statvfs(disk)
    (disk / "filler").write_bytes(b"\0" * max(stats.f_bavail * stats.f_frsize - leave, 0))


def test_a_full_disk_keeps_the_old_prefix_or_gives_the_new_one(two, tiny_disk):
    (old, new), candidates = two
    folder = tiny_disk / "prefix"
    old.save_prefix(folder)
    # no room for the new weights: the save fails with ENOSPC, the old prefix stays, nothing is left behind
    fill(tiny_disk, leave=1 << 20)
    with pytest.raises(OSError) as err:
        new.save_prefix(folder)
    assert err.value.errno == errno.ENOSPC or "No space left" in str(err.value)
    assert which(folder, candidates) == 0 and temporaries(folder) == []
    (tiny_disk / "filler").unlink()
    # room for the new weights but not for the JSON copy: the space of the old files is kept (hard links)
    os.link(folder / saving.WEIGHTS_NAME, tiny_disk / "old-weights")
    os.link(folder / saving.CONFIG_NAME, tiny_disk / "old-json")
    size = (folder / saving.WEIGHTS_NAME).stat().st_size
    fill(tiny_disk, leave=-(-size // 4096) * 4096)
    with pytest.raises(OSError):
        new.save_prefix(folder)
    assert which(folder, candidates) == 1 and temporaries(folder) == []
    assert not (folder / saving.CONFIG_NAME).exists(), "no JSON rather than one describing the old prefix"
    (tiny_disk / "filler").unlink()
    new.save_prefix(folder)
    assert json.loads((folder / saving.CONFIG_NAME).read_text())["format_version"] == saving.FORMAT_VERSION


@pytest.mark.parametrize("failing", ["weights", "json"])
def test_a_full_disk_simulated_by_a_writer_that_raises(two, tmp_path, monkeypatch, failing):
    (old, new), candidates = two
    folder = tmp_path / "prefix"
    old.save_prefix(folder)

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(saving, "serialize" if failing == "weights" else "write_text", no_space)
    with pytest.raises(OSError):
        new.save_prefix(folder)
    assert which(folder, candidates) == (0 if failing == "weights" else 1) and temporaries(folder) == []


# -- format 1 ---------------------------------------------------------------------------------------------------


def test_format_1_folders_still_load_and_mixed_ones_are_refused(two, tmp_path):
    (old, new), (old_tensors, new_tensors) = two
    write_format_1(tmp_path / "a", old_tensors, metadata(old, tmp_path))
    assert which(tmp_path / "a", [old_tensors]) == 0
    loaded = load_prefix(tiny.gpt2(), tmp_path / "a")
    assert all(torch.equal(loaded.prefixes["default"].tensors()[k], old_tensors[k]) for k in old_tensors)
    # the weights of one save beside the JSON of another: what format 1's checksum is for
    save_file({k: v.contiguous() for k, v in new_tensors.items()}, tmp_path / "a" / saving.WEIGHTS_NAME)
    with pytest.raises(ValueError, match="checksum differs"):
        load_prefix(tiny.gpt2(), tmp_path / "a")


def test_the_weights_file_alone_is_the_prefix(two, tmp_path):
    (old, _), (old_tensors, _) = two
    old.save_prefix(tmp_path)
    (tmp_path / saving.CONFIG_NAME).write_text("stale or damaged: never read")
    assert which(tmp_path, [old_tensors]) == 0
    (tmp_path / saving.CONFIG_NAME).unlink()
    assert load_prefix(tiny.gpt2(), tmp_path).prefixes["default"].num_virtual_tokens == P
    assert set(load_file(tmp_path / saving.WEIGHTS_NAME)) == set(old_tensors)


# -- loaders validate before they allocate -------------------------------------------------------------------------


def small(tmp_path, **config):
    model = tiny.gpt2()
    torch.manual_seed(3)
    pm = add_prefix(model, PrefixConfig(num_virtual_tokens=4, init_std=0.5, **config))
    pm.save_prefix(tmp_path / "prefix")
    return tmp_path / "prefix"


def rewrite_metadata(folder, edit):
    """Rewrite the metadata in the weights file's header: ``edit(meta dict)`` returns the new JSON text."""
    weights = folder / saving.WEIGHTS_NAME
    meta = json.loads(saving.safetensors_header(weights)[0][saving.METADATA_KEY])
    save_file(load_file(weights), weights, metadata={"format": "mmprefix", saving.METADATA_KEY: edit(meta)})


def refused(folder, *words, model=None):
    """Loading fails with a one-line ValueError holding ``words``; no prefix store is ever built."""
    with pytest.raises(ValueError) as err:
        load_prefix(model or tiny.gpt2(), folder)
    message = str(err.value)
    assert "\n" not in message and all(w in message for w in words), message
    return message


def edited(**changes):
    """An edit of the metadata: dotted keys set (or, with value ..., removed)."""

    def edit(meta):
        for dotted, value in changes.items():
            *parents, last = dotted.split("__")
            node = meta
            for part in parents:
                node = node[int(part)] if part.isdigit() else node[part]
            if value is ...:
                del node[last]
            else:
                node[last] = value
        return json.dumps(meta)

    return edit


@pytest.fixture
def no_allocation(monkeypatch):
    """Call it once the folder is ready: from then on, building a prefix store fails the test."""
    from mmprefix.core import store

    def built(*args, **kwargs):
        raise AssertionError("a prefix store was allocated before the folder was validated")

    return lambda: monkeypatch.setattr(store.PrefixStore, "__init__", built)


@pytest.mark.parametrize("edit, words", [
    (lambda meta: "[1, 2]", ["(metadata) holds a JSON array, expected the prefix metadata"]),
    (lambda meta: '"text"', ["holds a JSON string"]),
    (lambda meta: json.dumps(meta)[:-25], ["(metadata) is not valid JSON"]),
    (edited(prefix_config=...), ["lacks required setting(s) prefix_config"]),
    (edited(prefix_config__num_virtual_tokens="4"), ["prefix_config.num_virtual_tokens must be an integer, got text '4'"]),
    (edited(prefix_config__init_std="wide"), ["prefix_config.init_std must be a number"]),
    (edited(sites__0__heads="four"), ["sites[0].heads must be an integer"]),
    (edited(sites__0__kind="sideways"), ["kind must be 'self' or 'cross'"]),
    (edited(prefix_config__num_virtual_token=8), ["prefix_config.num_virtual_token is not a setting",
                                                  "did you mean 'num_virtual_tokens'"]),
    (edited(prefix_config__num_virtual_tokens=5), ["tensor 'transformer.h.0.attn.key' has shape (4, 4, 8), expected (4, 5, 8)"]),
    (edited(sites__1__head_dim=80), ["'transformer.h.1.attn.key' has shape (4, 4, 8), expected (4, 4, 80)"]),
    (edited(prefix_config__reparam="mlp", prefix_config__reparam_hidden=10_000_000),
     ["prefix_config.reparam is 'mlp' but the file holds no reparam.* tensors"]),
    (edited(prefix_config__gate="head"), ["missing ['transformer.h.0.attn.gate'"]),
    (edited(tensors_sha256=...), ["has no tensors_sha256"]),
    (edited(format_version=99), ["written by a newer mmprefix (format_version 99)"]),
    (edited(format_version="2"), ["format_version must be an integer"]),
    (edited(format="peft"), ["format is 'peft', expected 'mmprefix'"]),
], ids=lambda value: value[0] if isinstance(value, list) else None)
def test_bad_metadata_is_refused_by_file_and_field(edit, words, tmp_path, no_allocation):
    folder = small(tmp_path)
    rewrite_metadata(folder, edit)
    no_allocation()
    refused(folder, str(folder / saving.WEIGHTS_NAME), *words)


@pytest.mark.parametrize("content, words", [
    (b"\xff\xfe not utf-8", ["is not UTF-8 text"]),
    (b'{"format": "mmprefix", "format_version": 1, "prefix_config": {', ["is not valid JSON"]),
    (b"[]", ["holds a JSON array"]),
    (b"null", ["holds a JSON null"]),
])
def test_a_bad_format_1_json_is_refused_by_file(content, words, tmp_path, no_allocation):
    folder = small(tmp_path)
    save_file(load_file(folder / saving.WEIGHTS_NAME), folder / saving.WEIGHTS_NAME)  # format 1: no metadata
    (folder / saving.CONFIG_NAME).write_bytes(content)
    no_allocation()
    refused(folder, str(folder / saving.CONFIG_NAME), *words)


def test_a_tampered_tensor_is_refused_even_without_the_checksum_field(tmp_path, no_allocation):
    folder = small(tmp_path)
    weights = folder / saving.WEIGHTS_NAME
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0x40  # a bit of the last tensor's last value
    weights.write_bytes(bytes(data))
    no_allocation()
    refused(folder, str(weights), "do not match their checksum")
    rewrite_metadata(folder, edited(tensors_sha256=...))
    refused(folder, "has no tensors_sha256")
    # format 1: the JSON's checksum of the file, when removed, is not silently skipped either
    meta = json.loads(saving.safetensors_header(weights)[0][saving.METADATA_KEY])
    meta.pop("tensors_sha256", None)
    write_format_1(folder, load_file(weights), meta)
    loaded = json.loads((folder / saving.CONFIG_NAME).read_text())
    del loaded["weights_sha256"]
    (folder / saving.CONFIG_NAME).write_text(json.dumps(loaded))
    refused(folder, "has no weights_sha256")


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_values_are_refused_naming_the_tensor(bad, tmp_path, monkeypatch):
    model = add_prefix(tiny.gpt2(), PrefixConfig(num_virtual_tokens=4))
    with torch.no_grad():
        model.prefixes["default"].values["transformer-h-1-attn"][0, 2, 3] = bad
    with monkeypatch.context() as unchecked:  # a file that an older version (or another tool) wrote
        unchecked.setattr(saving, "refuse_non_finite", lambda *args: None)
        model.save_prefix(tmp_path)
    refused(tmp_path, str(tmp_path / saving.WEIGHTS_NAME), "'transformer.h.1.attn.value' holds 1 non-finite value")


def test_a_cut_short_weights_file_is_refused_by_name(tmp_path, no_allocation):
    folder = small(tmp_path)
    weights = folder / saving.WEIGHTS_NAME
    weights.write_bytes(weights.read_bytes()[:-100])
    no_allocation()
    refused(folder, str(weights), "not a readable safetensors file")
    weights.write_bytes(b"")
    refused(folder, "not a readable safetensors file")


def test_a_kept_reparameterisation_must_match_its_tensors(tmp_path, no_allocation):
    model = add_prefix(tiny.gpt2(), PrefixConfig(num_virtual_tokens=4, reparam="mlp", reparam_hidden=6))
    model.save_prefix(tmp_path, keep_reparam=True)
    rewrite_metadata(tmp_path, edited(prefix_config__reparam_hidden=10_000_000))
    no_allocation()
    refused(tmp_path, "'reparam.embedding' has shape (4, 6), expected (4, 10000000)")


# -- PEFT adapter folders ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def peft_folder(tmp_path_factory):
    from peft import PrefixTuningConfig, get_peft_model

    folder = tmp_path_factory.mktemp("peft")
    get_peft_model(tiny.gpt2(), PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3)).save_pretrained(folder)
    return folder


@pytest.fixture
def peft_copy(peft_folder, tmp_path, monkeypatch):
    """A copy of the adapter; reading its tensors fails the test (validation must come first)."""
    from mmprefix.core import peft_compat

    for name in ("adapter_config.json", "adapter_model.safetensors"):
        (tmp_path / name).write_bytes((peft_folder / name).read_bytes())
    real = peft_compat.load_finite
    monkeypatch.setattr(peft_compat, "load_finite", lambda path: pytest.fail("tensors read before validation"))
    return tmp_path, real


def edit_adapter(folder, **changes):
    config = json.loads((folder / "adapter_config.json").read_text())
    for key, value in changes.items():
        if value is ...:
            del config[key]
        else:
            config[key] = value
    (folder / "adapter_config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("content, words", [
    (b"[1]", ["adapter_config.json holds a JSON array"]),
    (b'"PREFIX_TUNING"', ["holds a JSON string"]),
    (b'{"peft_type": "PREFIX_TUNING", ', ["adapter_config.json is not valid JSON"]),
    (b"\xc3\x28", ["adapter_config.json is not UTF-8 text"]),
    (b'{"peft_type": "PREFIX_TUNING"}', ["adapter_config.json: missing task_type, num_virtual_tokens, num_layers"]),
])
def test_a_malformed_adapter_config_is_refused_by_file(content, words, peft_copy):
    folder, _ = peft_copy
    (folder / "adapter_config.json").write_bytes(content)
    refused(folder, *words)


@pytest.mark.parametrize("changes, words", [
    (dict(num_attention_heads="4"), ["adapter_config.json: num_attention_heads must be an integer, got text '4'"]),
    (dict(num_layers=...), ["missing num_layers"]),
    (dict(token_dim=30), ["token_dim 30 is not a multiple of num_attention_heads 4"]),
    (dict(num_virtual_tokens=2_000_000), ["prompt_embeddings has shape (3, 128), expected (2000000, 128)"]),
    (dict(num_layers=3), ["prompt_embeddings has shape (3, 128), expected (3, 192)"]),
    (dict(peft_type="LORA"), ["holds a PEFT LORA adapter; only PREFIX_TUNING adapters can be loaded"]),
    (dict(task_type="SEQ_2_SEQ_LM"), ["task_type is 'SEQ_2_SEQ_LM'"]),
])
def test_a_bad_adapter_config_field_is_refused_before_the_tensors_are_read(changes, words, peft_copy):
    folder, _ = peft_copy
    edit_adapter(folder, **changes)
    refused(folder, *words)


def test_a_non_finite_peft_adapter_is_refused(peft_copy, monkeypatch):
    from mmprefix.core import peft_compat

    folder, real = peft_copy
    monkeypatch.setattr(peft_compat, "load_finite", real)
    weights = folder / "adapter_model.safetensors"
    tensors = load_file(weights)
    tensors["prompt_embeddings"][1, 5] = float("nan")
    save_file(tensors, weights)
    refused(folder, str(weights), "'prompt_embeddings' holds 1 non-finite value")
    load_file(weights)  # the file itself is fine: the refusal is mmprefix's
