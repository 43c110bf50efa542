"""Writing files so that a reader never sees half of one: a temporary file beside the target, flushed to
disk, then renamed over it (``os.replace`` is atomic on POSIX and Windows), and the folder flushed so that the
rename survives a power cut. Temporary files carry the writer's host and process id, so that the temporary
file of a process killed mid-write can be told from one a live process is still writing; they are created with
the mode of any new file (0666 less the umask), which the renamed file keeps."""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import socket
import stat
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

_HOST = re.sub(r"[^A-Za-z0-9_]", "_", socket.gethostname()) or "host"
# .<target>.<host>-<pid>.<random>.tmp, as atomic_write names them
_TEMPORARY = re.compile(r"\.(?P<target>.+)\.(?P<host>[A-Za-z0-9_]+)-(?P<pid>\d+)\.[a-z0-9_]+\.tmp")
# .<target>.<random>.tmp: what versions before the host and pid were added left behind
_UNTAGGED = re.compile(r"\.(?P<target>.+)\.[a-z0-9_]{8}\.tmp")
FLOATS = ("F16", "BF16", "F32", "F64")  # the safetensors dtypes a prefix tensor may have
UNTAGGED_AGE = 3600  # seconds after which an untagged temporary file is surely abandoned
# .tmpXXXXXX: the temporary file of safetensors' own save_file, which a save killed inside it left behind (before
# mmprefix wrote prefix weights itself)
_SAFETENSORS = re.compile(r"\.tmp[A-Za-z0-9]{6}")


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Create or replace ``path`` with what ``write(temporary_path)`` writes; on any error the old file stays
    and the temporary file is removed (a process killed here leaves it: see `remove_stale_temporaries`)."""
    path = Path(path)
    tmp = _new_temporary(path)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    sync_folder(path.parent)
    return path


def _new_temporary(path: Path) -> str:
    """An empty new file beside ``path``, named for this host and process, with the mode of any new file (mkstemp's
    0600 would make every saved file private whatever the umask)."""
    while True:
        tmp = path.parent / f".{path.name}.{_HOST}-{os.getpid()}.{secrets.token_hex(4)}.tmp"
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            return str(tmp)
        except FileExistsError:
            continue


def sync_folder(folder: str | os.PathLike) -> None:
    """Flush a folder's entries (renames, removals) to disk; a no-op where folders cannot be opened."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # Windows
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def locked_folder(folder: str | os.PathLike) -> Iterator[None]:
    """Hold an exclusive lock on ``folder`` (``flock`` on the folder itself: no lock file is left behind);
    writers that take it one after the other never interleave their files. A no-op without ``fcntl``."""
    try:
        import fcntl
    except ImportError:  # Windows
        yield
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def remove_stale_temporaries(folder: str | os.PathLike, targets: tuple[str, ...]) -> list[Path]:
    """Remove the temporary files that writers of ``targets`` (file names in ``folder``) killed mid-write left
    behind: those of dead processes on this host, untagged ones over an hour old, and safetensors' own
    ``.tmpXXXXXX`` when a target is a ``.safetensors`` file (the caller holds the folder's `locked_folder`, so no
    writer of this folder is alive). A live writer's temporary file is left alone. Returns what was removed."""
    folder = Path(folder)
    removed = []
    for entry in folder.glob(".tmp*") if folder.is_dir() else []:
        if _SAFETENSORS.fullmatch(entry.name) and any(t.endswith(".safetensors") for t in targets):
            entry.unlink(missing_ok=True)
            removed.append(entry)
    for entry in folder.glob(".*.tmp") if folder.is_dir() else []:
        tagged = _TEMPORARY.fullmatch(entry.name)
        if tagged:
            stale = (tagged["target"] in targets and tagged["host"] == _HOST
                     and int(tagged["pid"]) != os.getpid() and not _alive(int(tagged["pid"])))
        else:
            untagged = _UNTAGGED.fullmatch(entry.name)
            stale = bool(untagged and untagged["target"] in targets
                         and time.time() - entry.stat().st_mtime > UNTAGGED_AGE)
        if stale:
            entry.unlink(missing_ok=True)
            removed.append(entry)
    return removed


def write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def write_json(path: str | os.PathLike, data: Any) -> Path:
    return write_text(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def read_json(path: str | os.PathLike, what: str = "a JSON object") -> dict[str, Any]:
    """A JSON object from ``path``; anything else (missing, not UTF-8, not JSON, truncated, not an object) is a
    one-line ``ValueError`` naming the file and what was expected."""
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise ValueError(f"{path} is missing; expected {what}") from None
    except UnicodeDecodeError as err:
        raise ValueError(f"{path} is not UTF-8 text (byte {err.start}); expected {what}") from None
    return parse_json_object(text, str(path), what)


def json_type(value: Any) -> str:
    """What JSON calls the type of a parsed value: object, array, string, number, boolean or null."""
    names = {dict: "object", list: "array", str: "string", bool: "boolean", int: "number", float: "number"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


def parse_json_object(text: str, source: str, what: str = "a JSON object") -> dict[str, Any]:
    """``text`` parsed as a JSON object, or a one-line ``ValueError`` naming ``source``."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{source} is not valid JSON ({err.msg} at line {err.lineno}, column {err.colno}); "
                         f"expected {what}") from None
    except RecursionError:
        raise ValueError(f"{source} nests too deeply to be {what}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{source} holds a JSON {json_type(data)}, expected {what}")
    return data


def safetensors_header(path: str | os.PathLike) -> tuple[dict[str, str], dict[str, tuple[str, tuple[int, ...]]]]:
    """The metadata and ``{name: (dtype, shape)}`` of a safetensors file, read from its header alone (no
    tensor is loaded); a missing, truncated or foreign file is a one-line ``ValueError`` naming it."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(os.fspath(path), framework="pt") as f:
            tensors = {}
            for name in f.keys():
                part = f.get_slice(name)
                tensors[name] = (part.get_dtype(), tuple(part.get_shape()))
            return dict(f.metadata() or {}), tensors
    except FileNotFoundError:
        raise ValueError(f"{path} is missing") from None
    except (SafetensorError, OSError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"{path} is not a readable safetensors file ({reason}): damaged or cut short?") from None


def load_finite(path: str | os.PathLike) -> dict[str, Any]:
    """The tensors of a safetensors file (whose header the caller checked); a non-finite value is refused
    naming its tensor, a damaged file naming the file."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        tensors = load_file(os.fspath(path))
    except (SafetensorError, OSError) as err:
        raise ValueError(f"{path} cannot be read ({err}): damaged or cut short?") from None
    refuse_non_finite(tensors, str(path), "refusing it")
    return tensors


def refuse_non_finite(tensors: dict[str, Any], source: str, outcome: str) -> None:
    """A ``ValueError`` naming ``source`` and the first tensor that holds NaN or infinity, and ``outcome``."""
    import torch

    for name, tensor in tensors.items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            bad = int((~torch.isfinite(tensor)).sum())
            raise ValueError(f"{source}: tensor {name!r} holds {bad} non-finite value(s) (NaN or infinity); {outcome}")


def not_a_file(path: Path) -> str | None:
    """What stands at ``path`` when it is not a regular file (a dangling symlink, a symlink loop, a folder, a FIFO,
    a device...), in words; None for a regular file or nothing at all."""
    if not os.path.lexists(path):
        return None
    link = f"a symlink to {os.readlink(path)}, " if path.is_symlink() else ""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        return f"a dangling symlink to {os.readlink(path)}"
    except OSError as err:  # ELOOP
        return f"a symlink that cannot be followed ({err.strerror})"
    if stat.S_ISREG(mode):
        return None
    kinds = {stat.S_ISDIR: "a folder", stat.S_ISFIFO: "a FIFO (named pipe)", stat.S_ISCHR: "a character device",
             stat.S_ISBLK: "a block device", stat.S_ISSOCK: "a socket"}
    return link + next((kind for test, kind in kinds.items() if test(mode)), "not a regular file")
