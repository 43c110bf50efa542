"""SIGTERM and SIGINT during training: stop after the current step, with a checkpoint."""

from __future__ import annotations

import signal
import sys
import threading
from typing import Any

import torch
from accelerate import Accelerator


class StopSignals:
    """While training, SIGTERM (a scheduler's preemption) and SIGINT (Ctrl-C) ask the loop to stop after the
    current step, with a checkpoint; a second one of either stops at once. Installed only in the main thread."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.received = 0
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for number in self.SIGNALS:
                self._previous[number] = signal.signal(number, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous = {}

    def _handle(self, number: int, frame: Any) -> None:
        if self.received:  # asked twice: no more waiting for the step to end
            self.__exit__()
            signal.raise_signal(number)
            return
        self.received = number
        print(f"\n{signal.Signals(number).name}: stopping after this step, with a checkpoint (again to stop now)",
              file=sys.stderr)

    def agreed(self, accelerator: Accelerator) -> int:
        """The signal any process received (every process must stop at the same step)."""
        if accelerator.num_processes == 1:
            return self.received
        flag = torch.tensor([self.received], device=accelerator.device)
        return int(accelerator.reduce(flag, reduction="max").item())
