"""Prefix tuning at real sizes on one GPU, prepared to run whenever one is lent (under 10 minutes on one large GPU):

    python benchmarks/gpu.py          # CUDA, bf16, random weights at real sizes
    python benchmarks/gpu.py --cpu    # the same script at a reduced size on the CPU (what the tests run)

Models, built from their configs with random weights in bf16 (cost does not depend on the values): BLIP-VQA base
(384 px), BLIP-2 OPT-2.7b (ViT-g, Q-Former, OPT-2.7b), InstructBLIP Vicuna-7B-sized (ViT-g, Q-Former, a
Llama-7B-shaped LM) and LLaVA-1.5-7B-sized (CLIP ViT-L/14 at 336 px, Llama-7B-shaped LM; its prefix targets
every ``self_attn`` by name). Three tables, in the format of docs/benchmarks.md:

1. Training: one step (forward, backward, AdamW) of a prefix (P=10 in every attention site), LoRA (PEFT, r=16 on
   all linear layers) and full fine-tuning, median time and peak memory (``max_memory_allocated``, weights
   included); full fine-tuning is reported as OOM where it does not fit. The 2.7B and 7B models train with
   gradient checkpointing, all three methods alike.
2. Overhead: forward and greedy generation with the prefix against the same model with ``disable_prefix()``,
   alternated call by call (medians). Rows are printed as they are measured, the tables at the end.
3. Routing: generation tokens/s of a batch of 8 rows routed to 8 different prefixes, the same batch with one
   prefix, and 8 calls of one row each.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch
import transformers as tf

from mmprefix import PrefixConfig, add_prefix


@dataclass
class Spec:
    """A model at real size (or reduced for --cpu), how to make its inputs, and how to target it."""

    title: str
    build: Callable[[bool], torch.nn.Module]  # reduced -> model
    inputs: Callable[[torch.nn.Module, int, str], dict]  # model, batch, "train" | "forward" | "generate" -> inputs
    checkpointing: bool
    target_modules: tuple[str, ...] = ()  # for models mmprefix finds no towers in: attention modules by name


def vit_g(reduced: bool) -> dict:  # BLIP-2's EVA ViT-g/14
    if reduced:
        return dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, image_size=28,
                    patch_size=14)
    return dict(hidden_size=1408, intermediate_size=6144, num_hidden_layers=39, num_attention_heads=16, image_size=224,
                patch_size=14)


def llama_7b(reduced: bool, vocab: int) -> dict:
    size = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4) if reduced else \
        dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32)
    return dict(model_type="llama", vocab_size=vocab, max_position_embeddings=4096, **size)


def qformer(reduced: bool) -> dict:
    if reduced:
        return dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
    return {}


def blip_vqa(reduced: bool) -> torch.nn.Module:
    size = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4) if reduced else {}
    vision = dict(size, image_size=32 if reduced else 384, initializer_range=0.02)
    return tf.BlipForQuestionAnswering(tf.BlipConfig(vision_config=vision, text_config=dict(size)))


def blip2_opt(reduced: bool) -> torch.nn.Module:
    text = dict(model_type="opt", vocab_size=50272, max_position_embeddings=2048)
    text.update(dict(hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4, word_embed_proj_dim=64)
                if reduced else dict(hidden_size=2560, ffn_dim=10240, num_hidden_layers=32, num_attention_heads=32,
                                     word_embed_proj_dim=2560))
    return tf.Blip2ForConditionalGeneration(tf.Blip2Config(
        vision_config=vit_g(reduced), qformer_config=qformer(reduced), text_config=text, num_query_tokens=32,
        image_token_index=50265))


def instructblip(reduced: bool) -> torch.nn.Module:
    return tf.InstructBlipForConditionalGeneration(tf.InstructBlipConfig(
        vision_config=vit_g(reduced), qformer_config=qformer(reduced), text_config=llama_7b(reduced, 32001),
        num_query_tokens=32, image_token_index=32000))


def llava(reduced: bool) -> torch.nn.Module:
    vision = dict(model_type="clip_vision_model", patch_size=14, projection_dim=768)
    vision.update(dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, image_size=56)
                  if reduced else dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                       num_attention_heads=16, image_size=336))
    return tf.LlavaForConditionalGeneration(tf.LlavaConfig(vision_config=vision, text_config=llama_7b(reduced, 32064),
                                                           image_token_index=32000))


def random_ids(batch: int, length: int, vocab: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(10, min(vocab, 30000), (batch, length), generator=torch.Generator().manual_seed(seed))


def blip_inputs(model, batch: int, kind: str) -> dict:
    """An image, a question, and (to train, or for a forward) the answer."""
    size = model.config.vision_config.image_size
    inputs = dict(pixel_values=torch.randn(batch, 3, size, size), input_ids=random_ids(batch, 12, 30000))
    if kind != "generate":
        inputs["labels" if kind == "train" else "decoder_input_ids"] = random_ids(batch, 6, 30000, seed=1)
    return inputs


def image_token_inputs(model, batch: int, kind: str, image_tokens: int, qformer_text: bool = False) -> dict:
    """Image placeholders then 32 text tokens (labels: the text; image positions ignored)."""
    config = model.config
    size = config.vision_config.image_size
    text = random_ids(batch, 32, config.text_config.vocab_size)
    ids = torch.cat([torch.full((batch, image_tokens), config.image_token_index), text], dim=1)
    inputs = dict(pixel_values=torch.randn(batch, 3, size, size), input_ids=ids, attention_mask=torch.ones_like(ids))
    if qformer_text:
        inputs["qformer_input_ids"] = random_ids(batch, 16, 30000, seed=2)
        inputs["qformer_attention_mask"] = torch.ones(batch, 16, dtype=torch.long)
    if kind == "train":
        inputs["labels"] = ids.masked_fill(ids == config.image_token_index, -100)
    return inputs


def query_inputs(model, batch: int, kind: str) -> dict:
    return image_token_inputs(model, batch, kind, model.config.num_query_tokens,
                              qformer_text=isinstance(model, tf.InstructBlipForConditionalGeneration))


def llava_inputs(model, batch: int, kind: str) -> dict:
    vision = model.config.vision_config
    return image_token_inputs(model, batch, kind, (vision.image_size // vision.patch_size) ** 2)


SPECS = {
    "blip_vqa": Spec("BLIP-VQA base", blip_vqa, blip_inputs, checkpointing=False),
    "blip2_opt": Spec("BLIP-2 OPT-2.7b", blip2_opt, query_inputs, checkpointing=True),
    "instructblip": Spec("InstructBLIP Vicuna-7B-sized", instructblip, query_inputs, checkpointing=True),
    "llava": Spec("LLaVA-1.5-7B-sized", llava, llava_inputs, checkpointing=True, target_modules=(r".*\.self_attn",)),
}


class Bench:
    def __init__(self, args) -> None:
        self.device = torch.device("cpu" if args.cpu else "cuda")
        self.dtype = torch.bfloat16
        self.args = args

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def timed(self, fn: Callable[[], object]) -> float:
        self.sync()
        started = time.perf_counter()
        fn()
        self.sync()
        return time.perf_counter() - started

    def interleaved(self, fns: dict[str, Callable], repeats: int) -> dict[str, float]:
        """Median seconds per call, the functions called in alternating order (one warm-up call each)."""
        times: dict[str, list[float]] = {name: [] for name in fns}
        for fn in fns.values():
            fn()
        for i in range(repeats):
            for name in (list(fns) if i % 2 == 0 else list(fns)[::-1]):
                times[name].append(self.timed(fns[name]))
        return {name: statistics.median(t) for name, t in times.items()}

    def to_device(self, inputs: dict) -> dict:
        return {k: v.to(self.device, self.dtype if v.is_floating_point() else None) for k, v in inputs.items()}

    def build(self, spec: Spec) -> torch.nn.Module:
        """The model made on the device directly in bf16 (a 7B model never exists in float32)."""
        torch.manual_seed(0)
        default = torch.get_default_dtype()
        torch.set_default_dtype(self.dtype)
        try:
            with torch.device(self.device):
                model = spec.build(self.args.cpu).to(self.dtype)
        finally:
            torch.set_default_dtype(default)
        return model.eval()

    def peak(self) -> float | None:
        return torch.cuda.max_memory_allocated() / 2**30 if self.device.type == "cuda" else None

    def reset_peak(self) -> None:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()

    def train(self, model: torch.nn.Module, trained: torch.nn.Module, spec: Spec) -> tuple[float, float | None]:
        """Median step time and peak memory of AdamW steps on whatever ``trained`` leaves trainable."""
        parameters = [p for p in trained.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(parameters, lr=1e-5)
        batch = self.to_device(spec.inputs(model, self.args.batch_size, "train"))
        trained.train()

        def step():
            trained(**batch).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        times = [self.timed(step) for _ in range(self.args.train_steps + 1)][1:]
        trained.eval()
        return statistics.median(times), self.peak()


def prefix_config(spec: Spec, args, **options) -> PrefixConfig:
    return PrefixConfig(num_virtual_tokens=args.prefix_tokens, target_modules=list(spec.target_modules), **options)


def training_rows(bench: Bench, spec: Spec, model: torch.nn.Module) -> list[str]:
    from peft import LoraConfig, get_peft_model

    args, rows = bench.args, []
    weights = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**30
    total = sum(p.numel() for p in model.parameters())
    size = f"{total / 1e9:.2f}B" if total >= 1e9 else f"{total / 1e6:.1f}M"

    def checkpointing(target: torch.nn.Module) -> None:
        if spec.checkpointing:
            target.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    def report(method: str, trained: torch.nn.Module) -> None:
        trainable = sum(p.numel() for p in trained.parameters() if p.requires_grad)
        try:
            seconds, peak = bench.train(model, trained, spec)
            memory = f"{peak:.1f} GiB ({peak / weights:.2f}x)" if peak is not None else "n/a (CPU)"
            rows.append(f"| {spec.title} | {size} | {method} | {100 * trainable / total:.3f}% | {seconds:.3f} s | "
                        f"{memory} |")
        except torch.cuda.OutOfMemoryError:
            rows.append(f"| {spec.title} | {size} | {method} | {100 * trainable / total:.3f}% | OOM | OOM |")

    bench.reset_peak()
    pm = add_prefix(model, prefix_config(spec, args))
    if spec.checkpointing:
        pm.gradient_checkpointing_enable()
    report("prefix", pm)
    pm.remove_prefix()
    bench.reset_peak()
    lora = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
    checkpointing(model)
    report("LoRA (PEFT)", lora)
    lora.unload()
    bench.reset_peak()
    model.requires_grad_(True)
    checkpointing(model)
    report("full fine-tuning", model)
    model.requires_grad_(False)
    if spec.checkpointing:
        model.gradient_checkpointing_disable()
    return rows


@torch.no_grad()
def overhead_rows(bench: Bench, spec: Spec, model: torch.nn.Module) -> list[str]:
    args = bench.args
    pm = add_prefix(model, prefix_config(spec, args))
    inputs = bench.to_device(spec.inputs(model, args.batch_size, "forward"))
    prompts = bench.to_device(spec.inputs(model, args.batch_size, "generate"))
    generation = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False, num_beams=1)

    def off(fn):
        def call():
            with pm.disable_prefix():
                fn()
        return call

    forward = lambda: pm(**inputs)  # noqa: E731
    generate = lambda: pm.generate(**prompts, **generation)  # noqa: E731
    rows = []
    for name, fn in (("forward", forward), (f"greedy generation ({args.new_tokens} tokens)", generate)):
        t = bench.interleaved({"base": off(fn), "prefix": fn}, args.repeats)
        rows.append(f"| {spec.title} | {name} | {t['base']:.3f} s | {t['prefix']:.3f} s | {t['prefix'] / t['base']:.3f} |")
    pm.remove_prefix()
    return rows


@torch.no_grad()
def routing_rows(bench: Bench, spec: Spec, model: torch.nn.Module) -> list[str]:
    args = bench.args
    names = [f"p{i}" for i in range(8)]
    pm = add_prefix(model, prefix_config(spec, args), name=names[0])
    for name in names[1:]:
        pm.add_prefix(name, prefix_config(spec, args))
    inputs = bench.to_device(spec.inputs(model, len(names), "generate"))
    rows_of = [{k: v[i:i + 1] for k, v in inputs.items()} for i in range(len(names))]
    generation = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False, num_beams=1)
    t = bench.interleaved({
        "mixed": lambda: pm.generate(**inputs, prefix=names, **generation),
        "one": lambda: pm.generate(**inputs, prefix=names[0], **generation),
        "single": lambda: [pm.generate(**row, prefix=name, **generation) for row, name in zip(rows_of, names)],
    }, args.repeats)
    pm.remove_prefix()
    rate = {k: len(names) * args.new_tokens / v for k, v in t.items()}
    return [f"| {spec.title} | greedy generation ({args.new_tokens} tokens) | {rate['mixed']:.1f} | {rate['one']:.1f} | "
            f"{rate['single']:.1f} | {rate['mixed'] / rate['one']:.3f} | {rate['mixed'] / rate['single']:.2f} |"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Prefix tuning at real sizes on one GPU (see the module docstring)")
    parser.add_argument("--cpu", action="store_true", help="reduced sizes on the CPU (checks the script itself)")
    parser.add_argument("--models", nargs="*", default=list(SPECS), choices=list(SPECS))
    parser.add_argument("--batch-size", type=int, default=None, help="training and overhead batch (default 8, CPU 2)")
    parser.add_argument("--train-steps", type=int, default=None, help="timed steps per method (default 5, CPU 1)")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls per latency (default 3, CPU 1)")
    parser.add_argument("--new-tokens", type=int, default=None, help="generated tokens (default 32, CPU 4)")
    parser.add_argument("--prefix-tokens", type=int, default=10)
    args = parser.parse_args(argv)
    small = args.cpu
    args.batch_size = args.batch_size or (2 if small else 8)
    args.train_steps = args.train_steps or (1 if small else 5)
    args.repeats = args.repeats or (1 if small else 3)
    args.new_tokens = args.new_tokens or (4 if small else 32)
    if not small and not torch.cuda.is_available():
        parser.error("no CUDA device: run with --cpu for the reduced sizes")
    bench = Bench(args)
    where = "CPU, reduced sizes" if small else torch.cuda.get_device_name()
    print(f"# {where}, bf16, random weights; batch {args.batch_size}, P={args.prefix_tokens}; torch "
          f"{torch.__version__}, transformers {tf.__version__}; load average {os.getloadavg()[0]:.1f}", flush=True)
    tables = {
        "training": ["| model | parameters | method | trainable | training step | peak memory (x weights) |",
                     "|---|---|---|---|---|---|"],
        "overhead": ["| model | measurement | without prefix | with prefix | ratio |", "|---|---|---|---|---|"],
        "routing": ["| model | measurement (tokens/s) | 8 prefixes in one batch | one prefix | 8 calls of batch 1 | "
                    "mixed vs one prefix | mixed vs batch-1 calls |", "|---|---|---|---|---|---|---|"],
    }
    started = time.perf_counter()
    for name in args.models:
        spec = SPECS[name]
        model = bench.build(spec)
        for table, rows in (("overhead", overhead_rows), ("routing", routing_rows), ("training", training_rows)):
            new = rows(bench, spec, model)
            tables[table] += new
            print("\n".join(new), f"\n{spec.title}: {table} done ({time.perf_counter() - started:.0f} s)", flush=True)
        del model
        bench.reset_peak()
    for rows in tables.values():
        print("\n" + "\n".join(rows))
    print(f"\n({time.perf_counter() - started:.0f} s in all)")


if __name__ == "__main__":
    main()
