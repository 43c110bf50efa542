"""Every family with its base sharded by FSDP on two processes against the same model unsharded, run by
tests/training/test_fsdp.py under torchrun: python tests/fsdp_families.py RESULT_JSON. Each process computes the
unsharded reference itself (same seed, same inputs), then the sharded model: loss, prefix gradients, greedy
generation, and the bytes of base weights it holds."""

import json
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(__file__))
import tiny  # noqa: E402

from mmprefix import PrefixConfig, add_prefix  # noqa: E402
from mmprefix.training import distributed  # noqa: E402

FAMILIES = ["llama", "gpt2", "t5", "clip", "blip_caption", "blip_vqa", "blip2_opt", "blip2_t5", "instructblip"]
MEMORY = ["llama", "blip_caption", "clip"]  # also with a memory prefix (method="memory"), as "<family>:memory"


def run(case, shard, checkpointing):
    family, _, method = case.partition(":")
    build, inputs, output = tiny.FAMILIES[family]
    model = build()
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    pm = add_prefix(model, PrefixConfig(num_virtual_tokens=3, init_std=0.5, method=method or "prefix"))
    if method == "memory":  # values start at zero: give the memory a visible effect
        with torch.no_grad():
            for value in pm.prefixes["default"].values.values():
                value.normal_(generator=torch.Generator().manual_seed(1))
    whole = distributed.local_parameter_bytes(pm.base_model)
    if checkpointing:
        pm.gradient_checkpointing_enable()
    if shard:
        distributed.shard(pm, torch.device("cpu"))
    pm.train()
    loss = output(pm(**inputs())).float().pow(2).mean()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in pm.prefixes.named_parameters()}
    pm.eval()
    tokens = None
    if family in tiny.GENERATORS:
        generation_inputs, extra = tiny.GENERATORS[family]
        with torch.no_grad():
            tokens = pm.generate(**generation_inputs(), max_new_tokens=4, do_sample=False, **extra).tolist()
    if shard:
        pm.base_model.reshard()  # the root group stays gathered after an inference forward
    return loss.item(), grads, tokens, whole, distributed.local_parameter_bytes(pm.base_model)


def main():
    dist.init_process_group("gloo")
    results = {}
    for family in FAMILIES + [f"{f}:memory" for f in MEMORY]:
        checkpointing = family in ("llama", "blip_vqa", "blip2_opt", "llama:memory")
        loss, grads, tokens, whole, _ = run(family, shard=False, checkpointing=False)
        sharded_loss, sharded_grads, sharded_tokens, _, local = run(family, shard=True, checkpointing=checkpointing)
        results[family] = {
            "loss": [loss, sharded_loss],
            "grad_difference": max((grads[k] - sharded_grads[k]).abs().max().item() for k in grads),
            "grad_scale": max(g.abs().max().item() for g in grads.values()),
            "tokens": [tokens, sharded_tokens],
            "local_fraction": local / whole,
            "checkpointing": checkpointing,
        }
    with open(f"{sys.argv[1]}.rank{dist.get_rank()}", "w") as f:
        json.dump(results, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
