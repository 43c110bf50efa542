"""What stands in a prefix folder, beyond kills and full disks (test_prefix_folders.py): leftovers of safetensors'
own writer, non-finite prefixes, a load racing a save, entries that are not files, PEFT tensors of another type,
and the mode of saved files."""

import os
import socket
import stat

import pytest
import torch
from safetensors.torch import load_file, save_file

import tiny
from mmprefix import PrefixConfig, add_prefix, load_prefix
from mmprefix.core import saving


def prefix_model(seed, p=4):
    model = tiny.gpt2()
    torch.manual_seed(seed)
    return add_prefix(model, PrefixConfig(num_virtual_tokens=p, init_std=1.0))


def tensors_of(model):
    return model.prefixes["default"].tensors()


def same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_save_leaves_no_temporary_file_of_safetensors_and_removes_old_ones(tmp_path):
    """safetensors' save_file writes its own ``.tmpXXXXXX`` beside the target: a save killed inside it left one
    (195 MiB after 20 kills) that no later save removed."""
    model = prefix_model(1)
    calls = []
    real = os.replace

    def replace(source, target):
        calls.append(os.path.basename(source))
        return real(source, target)

    leftover = tmp_path / ".tmpAb12Cd"  # what a save killed inside safetensors' writer left
    tmp_path.mkdir(exist_ok=True)
    leftover.write_bytes(b"half a file")
    os.replace = replace
    try:
        model.save_prefix(tmp_path)
    finally:
        os.replace = real
    assert not leftover.exists(), "the next save removes it"
    assert not [name for name in calls if name.startswith(".tmp")], "no file of safetensors' own writer: " + str(calls)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prefix.safetensors", "prefix_config.json"]


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_non_finite_prefix_is_refused_and_the_folder_keeps_the_good_one(bad, tmp_path):
    good = prefix_model(1)
    good.save_prefix(tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    broken = prefix_model(2)
    with torch.no_grad():
        next(broken.prefixes.parameters())[0, 0, 0] = bad
    with pytest.raises(ValueError, match=r"the prefix to save in .*: tensor '.*' holds 1 non-finite value\(s\) "
                                         r"\(NaN or infinity\); nothing was written"):
        broken.save_prefix(tmp_path)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    assert same(load_prefix(tiny.gpt2(), tmp_path).prefixes["default"].tensors(), tensors_of(good))


def test_a_load_racing_a_save_reads_the_new_prefix_whole(tmp_path, monkeypatch):
    """The loader reads the header, then the tensors; a save landing in between made it refuse a whole folder
    ("the tensors do not match their checksum ... altered after it was saved")."""
    old, new = prefix_model(1), prefix_model(2)
    old.save_prefix(tmp_path)
    real, landed = saving.load_finite, []

    def racing(path):
        if not landed:  # another process's save lands between the header and the tensors
            landed.append(1)
            new.save_prefix(tmp_path)
        return real(path)

    monkeypatch.setattr(saving, "load_finite", racing)
    meta, tensors = saving.read_prefix(tmp_path)
    assert landed and same(tensors, tensors_of(new)) and meta.tensors_sha256 == saving.tensors_digest(tensors)


def test_a_folder_really_altered_is_still_refused(tmp_path, monkeypatch):
    prefix_model(1).save_prefix(tmp_path)
    weights = tmp_path / saving.WEIGHTS_NAME
    header = saving.safetensors_header(weights)[0]
    tensors = {k: v + 1 for k, v in load_file(weights).items()}
    save_file(tensors, weights, metadata=header)  # tampered: another file, the same in every read
    with pytest.raises(ValueError, match="do not match their checksum"):
        saving.read_prefix(tmp_path)


def fifo(path):
    os.mkfifo(path)


def unix_socket(path):
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(path))
    return server


@pytest.mark.parametrize("make, words", [
    (lambda p: p.symlink_to(p.parent / "gone.safetensors"), "is a dangling symlink to "),
    (lambda p: p.symlink_to(p), "is a symlink that cannot be followed (Too many levels of symbolic links)"),
    (fifo, "is a FIFO (named pipe), not a file"),
    (lambda p: p.symlink_to("/dev/zero"), "is a symlink to /dev/zero, a character device, not a file"),
    (lambda p: p.mkdir(), "is a folder, not a file"),
    (unix_socket, "is a socket, not a file"),
])
def test_an_entry_that_is_not_a_file_is_named_for_what_it_is(make, words, tmp_path):
    """Before: "expected prefix.safetensors ... found ['prefix.safetensors', ...]" for all of these."""
    keep = make(tmp_path / saving.WEIGHTS_NAME)
    try:
        with pytest.raises(ValueError) as err:
            load_prefix(tiny.gpt2(), tmp_path)
    finally:
        if keep is not None:
            keep.close()
    assert str(err.value).startswith(f"{tmp_path / saving.WEIGHTS_NAME} is ") and words in str(err.value), str(err.value)


def test_a_peft_adapter_with_integer_prompt_embeddings_is_refused_like_an_mmprefix_folder(tmp_path):
    from peft import PrefixTuningConfig, get_peft_model

    get_peft_model(tiny.gpt2(), PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3)).save_pretrained(tmp_path)
    weights = tmp_path / "adapter_model.safetensors"
    table = load_file(weights)["prompt_embeddings"]
    save_file({"prompt_embeddings": (table * 100).to(torch.int32)}, weights)
    with pytest.raises(ValueError, match=r"adapter_model.safetensors: prompt_embeddings is I32, expected floating point"):
        load_prefix(tiny.gpt2(), tmp_path)


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_saved_files_have_the_mode_the_umask_gives(umask, tmp_path):
    """mkstemp (and safetensors' writer) create 0600 files: a prefix saved for a team was private to its writer."""
    before = os.umask(umask)
    try:
        prefix_model(1).save_prefix(tmp_path / "p")
    finally:
        os.umask(before)
    for name in (saving.WEIGHTS_NAME, saving.CONFIG_NAME):
        assert stat.S_IMODE((tmp_path / "p" / name).stat().st_mode) == 0o666 & ~umask, name
