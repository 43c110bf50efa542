"""A tiny training run for the engine tests, started as its own process (killed, resumed, or launched on two
processes, sharded with --fsdp): python tests/train_tiny.py OUTPUT_DIR STEPS [--resume] [--slow] [--accumulate N]
[--fsdp] [--checkpointing] [--full-disk-on-main] (rank 0 cannot publish a checkpoint: "No space left on
device")."""

import argparse
import json
import os
import sys
import time

import torch
from safetensors.torch import save_file

sys.path.insert(0, os.path.dirname(__file__))
import tiny  # noqa: E402

from mmprefix import PrefixConfig, add_prefix  # noqa: E402
from mmprefix.training import TrainConfig, TrainingInterrupted, checkpoints, train  # noqa: E402
from mmprefix.training.distributed import local_parameter_bytes  # noqa: E402


class Rows(torch.utils.data.Dataset):
    def __init__(self, count: int = 40):
        self.ids = torch.randint(4, 90, (count, 8), generator=torch.Generator().manual_seed(5))

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, index):
        return self.ids[index]


def make_collate(slow: bool):
    def collate(rows):
        if slow:  # gives a test time to kill the process between checkpoints
            time.sleep(0.05)
        ids = torch.stack(rows)
        return {"input_ids": ids, "labels": ids}

    return collate


def build(dropout: float):
    model = tiny.gpt2()
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = dropout
    return add_prefix(model, PrefixConfig(num_virtual_tokens=4))


def tiny_config(output_dir: str, steps: int, accumulate: int = 1, **options) -> TrainConfig:
    return TrainConfig(output_dir=output_dir, max_steps=steps, batch_size=4, learning_rate=1e-2, save_every=4,
                       log_every=2, gradient_accumulation_steps=accumulate, plot=False, **options)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("output_dir")
    parser.add_argument("steps", type=int)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--slow", action="store_true")
    parser.add_argument("--accumulate", type=int, default=1)
    parser.add_argument("--dropout", type=float, default=0.1)
    parser.add_argument("--fsdp", action="store_true")
    parser.add_argument("--checkpointing", action="store_true")
    parser.add_argument("--full-disk-on-main", action="store_true")
    args = parser.parse_args()
    if args.full_disk_on_main and os.environ.get("RANK", "0") == "0":
        def full_disk(*args, **kwargs):
            raise OSError(28, "No space left on device")

        checkpoints.publish_checkpoint = full_disk
    pm = build(args.dropout)
    whole = local_parameter_bytes(pm.base_model)
    config = tiny_config(args.output_dir, args.steps, args.accumulate, resume=args.resume, fsdp=args.fsdp,
                         gradient_checkpointing=args.checkpointing)
    try:
        train(pm, Rows(), make_collate(args.slow), config)
    except TrainingInterrupted as stopped:  # SIGTERM / SIGINT: a checkpoint was saved
        print(stopped, file=sys.stderr)
        sys.exit(128 + stopped.signal_number)
    rank = os.environ.get("RANK", "0")
    weights = {n: p.detach().contiguous() for n, p in pm.prefixes.named_parameters()}
    save_file(weights, os.path.join(args.output_dir, f"final-rank{rank}.safetensors"))
    memory = {"whole": whole, "local": local_parameter_bytes(pm.base_model)}
    with open(os.path.join(args.output_dir, f"memory-rank{rank}.json"), "w") as f:
        json.dump(memory, f)
    if torch.distributed.is_initialized():  # gloo's threads still running at exit can abort it ("terminate called")
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
