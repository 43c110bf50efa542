"""What a training run is told (`TrainSettings`, and `TrainConfig` with its output folder) and how it ends when it
cannot finish (`TrainingError`, `TrainingInterrupted`). Imports nothing heavy, so that settings can be read and
checked before torch loads."""

from __future__ import annotations

from dataclasses import dataclass, field


class TrainingError(RuntimeError):
    """Training cannot go on (a non-finite loss or gradient, a folder another run holds); the message says where
    and what is kept."""


class TrainingInterrupted(TrainingError):
    """SIGTERM or SIGINT stopped training after a checkpoint was saved; ``--resume`` continues it exactly."""

    def __init__(self, message: str, signal_number: int, checkpoint: str | None):
        super().__init__(message)
        self.signal_number = signal_number
        self.checkpoint = checkpoint


MIXED_PRECISION = ("no", "fp16", "bf16")


@dataclass
class TrainSettings:
    """Settings of one training run (a recipe config's ``train:`` section)."""

    max_steps: int = 500
    batch_size: int = 16  # rows per optimizer step and micro-step, split across processes
    gradient_accumulation_steps: int = 1
    learning_rate: float = 5e-3
    weight_decay: float = 0.0
    warmup_steps: int = 0
    max_grad_norm: float | None = 1.0
    mixed_precision: str = "no"  # "no", "fp16" or "bf16"
    gradient_checkpointing: bool = False
    fsdp: bool = False  # shard the frozen base across processes (FSDP2); the prefix stays whole on each
    seed: int = 0
    log_every: int = 10
    eval_every: int = 0  # 0: evaluate once, at the end
    save_every: int = 0  # 0: a checkpoint only when a signal stops the run
    keep_checkpoints: int = 2
    resume: bool = False
    resume_with_changes: bool = False  # resume although the settings differ from the checkpoint's
    metric: str | None = None  # the evaluation metric that picks the best model
    greater_is_better: bool = True
    trackers: list[str] = field(default_factory=list)  # accelerate trackers, e.g. ["tensorboard"]
    num_workers: int = 0
    plot: bool = True

    def __post_init__(self) -> None:
        if self.mixed_precision not in MIXED_PRECISION:
            raise ValueError(f"mixed_precision must be 'no', 'fp16' or 'bf16', got {self.mixed_precision!r}")
        at_least = {"max_steps": 1, "batch_size": 1, "gradient_accumulation_steps": 1, "log_every": 1,
                    "keep_checkpoints": 1, "warmup_steps": 0, "eval_every": 0, "save_every": 0, "num_workers": 0}
        for name, least in at_least.items():
            if getattr(self, name) < least:
                raise ValueError(f"{name} must be >= {least}, got {getattr(self, name)}")
        if not self.learning_rate > 0 or self.weight_decay < 0 or (self.max_grad_norm is not None and self.max_grad_norm <= 0):
            raise ValueError("learning_rate and max_grad_norm must be > 0 and weight_decay >= 0, got "
                             f"{self.learning_rate}, {self.max_grad_norm}, {self.weight_decay}")


@dataclass(kw_only=True)
class TrainConfig(TrainSettings):
    """`TrainSettings` and the folder the run owns: checkpoints, logs, the trained model (see `train`)."""

    output_dir: str

    def __post_init__(self) -> None:
        super().__post_init__()
        if not str(self.output_dir).strip():  # Path("") is the working directory: never written into by accident
            raise ValueError("output_dir is empty: name the folder the run owns")
