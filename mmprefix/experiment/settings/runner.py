"""The end of a command: its problems as one readable line and an exit status."""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from typing import Any


from ...training.config import TrainingError, TrainingInterrupted
from ...models.loading import LoadError
from .yamlfile import SettingsError


def run(main: Callable[[Sequence[str] | None], Any], argv: Sequence[str] | None = None, name: str = "recipe") -> int:
    """Run a command's ``main``: settings, loading and data problems end with one readable line and status 2; a
    run stopped by SIGTERM/SIGINT (after saving a checkpoint) with 128 + the signal number."""
    try:
        main(argv)
    except TrainingInterrupted as err:
        print(f"{name}: {err}", file=sys.stderr)
        return 128 + err.signal_number
    except (SettingsError, LoadError, FileNotFoundError, TrainingError) as err:
        print(f"{name}: error: {err}", file=sys.stderr)
        return 2
    except ValueError as err:
        if not isinstance(err, _data_errors()):
            raise  # a bug, not bad input: the traceback is what helps
        print(f"{name}: error: {err}", file=sys.stderr)
        return 2
    return 0


def _data_errors() -> tuple[type, ...]:
    """Errors of bad data or files, whose messages name the file and what to fix (loaded once needed)."""
    from ...data import AnnotationError, BadImageError, NoReadableImages
    from ...training.checkpoints import CheckpointMismatch, DamagedCheckpoint

    return AnnotationError, BadImageError, NoReadableImages, DamagedCheckpoint, CheckpointMismatch
