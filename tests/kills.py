"""Kills at every file operation: a save run in a forked child that SIGKILLs itself just before its n-th file
operation in a folder, for every n, and what the folder then loads as (the prefix-folder and the Trainer tests)."""

import os
import signal
import sys

import torch

from mmprefix.core import saving


def which(folder, candidates):
    """The index of the candidate tensors the folder loads as (None: neither)."""
    _, tensors = saving.read_prefix(folder)
    for index, expected in enumerate(candidates):
        if tensors.keys() == expected.keys() and all(torch.equal(tensors[k], expected[k]) for k in tensors):
            return index
    return None


def run_in_child(work):
    """Fork; the child runs ``work()`` and exits 0 (or dies of the signal it sends itself). Returns the status."""
    pid = os.fork()
    if pid == 0:
        try:
            work()
        finally:
            os._exit(0)
    return os.waitpid(pid, 0)[1]


def kill_at(folder, count):
    """An audit hook that SIGKILLs this process just before its ``count``-th file operation in ``folder``
    (opening, creating, renaming or removing a file there), and counts them in ``seen``."""
    seen = [0]

    def hook(event, args):
        if event in ("open", "os.rename", "os.remove", "tempfile.mkstemp") and args and str(folder) in str(args[0]):
            seen[0] += 1
            if seen[0] == count:
                os.kill(os.getpid(), signal.SIGKILL)

    sys.addaudithook(hook)
    return seen


def kill_outcomes(folder, prepare, save, candidates, after_each=lambda: None):
    """``save()`` run once in a child to count its file operations in ``folder``; then, for every one of them,
    ``prepare()`` the folder and SIGKILL a child's ``save()`` just before that operation. Returns the number of
    operations and, per kill, which of ``candidates`` the folder then loads as (None: neither)."""
    reader, writer = os.pipe()

    def count():
        seen = kill_at(folder, -1)
        save()
        os.write(writer, str(seen[0]).encode())

    prepare()
    assert run_in_child(count) == 0
    operations = int(os.read(reader, 100))
    outcomes = []
    for point in range(1, operations + 1):
        prepare()
        status = run_in_child(lambda: (kill_at(folder, point), save()))
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
        outcomes.append(which(folder, candidates))
        after_each()
    return operations, outcomes
