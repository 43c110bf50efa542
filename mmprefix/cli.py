"""Command line: ``mmprefix sites MODEL`` prints where prefixes go and how big they are."""

from __future__ import annotations

import argparse
import sys

import torch
from torch import nn

from .architectures import Site, scan, select_sites, tower_layout, unreachable_towers
from .config import PrefixConfig


def build_skeleton(name_or_path: str) -> nn.Module:
    """The model's architecture from its config alone, on the meta device: no weights are read or downloaded."""
    import transformers

    try:
        config = transformers.AutoConfig.from_pretrained(name_or_path)
    except OSError as err:
        raise SystemExit(f"mmprefix: cannot read a model config from {name_or_path!r}: {err}") from None
    architectures = getattr(config, "architectures", None) or []
    cls = getattr(transformers, architectures[0], None) if architectures else None
    with torch.device("meta"):
        if cls is None:
            return transformers.AutoModel.from_config(config)
        return cls._from_config(config)


def format_sites(sites: list[Site], num_virtual_tokens: int, total_parameters: int | None = None) -> str:
    columns = ("name", "tower", "kind", "layer", "heads", "kv_heads", "head_dim", "prefix_params")
    rows = [
        (s.name, s.tower, s.kind, s.layer, s.heads, s.kv_heads, s.head_dim, f"{s.prefix_numel(num_virtual_tokens):,}")
        for s in sites
    ]
    widths = [max(len(str(x)) for x in column) for column in zip(columns, *rows)]
    lines = ["  ".join(str(x).ljust(w) for x, w in zip(row, widths)).rstrip() for row in (columns, *rows)]
    total = sum(s.prefix_numel(num_virtual_tokens) for s in sites)
    summary = f"{len(sites)} sites, {total:,} prefix parameters with P={num_virtual_tokens}"
    if total_parameters:
        summary += f" ({100 * total / total_parameters:.3f}% of the model's {total_parameters:,})"
    return "\n".join([*lines, summary])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mmprefix", description="Prefix tuning for frozen vision-language models.")
    commands = parser.add_subparsers(dest="command", required=True)
    sites = commands.add_parser("sites", help="list the attention sites of a model and their prefix sizes")
    sites.add_argument("model", help="Hugging Face model id or local folder with config.json")
    sites.add_argument("-p", "--num-virtual-tokens", type=int, default=PrefixConfig.num_virtual_tokens)
    sites.add_argument("--targets", nargs="+", help="e.g. vision.self 'lm.self[-4:]' (default: all)")
    sites.add_argument("--target-modules", nargs="+", help="regular expressions on module names")
    args = parser.parse_args(argv)

    model = build_skeleton(args.model)
    try:
        available, unused = scan(model, args.target_modules)
        selected = select_sites(available, args.targets)
    except ValueError as err:
        print(f"mmprefix: {err}", file=sys.stderr)
        return 2
    print(format_sites(selected, args.num_virtual_tokens, sum(p.numel() for p in model.parameters())))
    for line in coverage_notes(model, available, unused):
        print(line)
    return 0


def coverage_notes(model: nn.Module, sites: list[Site], unused: dict[str, str]) -> list[str]:
    """Which record covers the model (or that the generic fallback named its towers), and what was left out."""
    layout = tower_layout(model)
    if layout is None:
        notes = ["towers: none known (sites chosen by target_modules, in one tower called 'model')"]
    elif layout.fallback:
        notes = ["towers: generic fallback (no tested record for this family; towers named after its sub-models)"]
    else:
        notes = [f"towers: the tested record of family {layout.family.name!r}"]
    notes += [f"left out: {name}: {why}" for name, why in unused.items()]
    notes += [f"unreachable: the {tower!r} tower ({why})" for tower, why in unreachable_towers(model, sites).items()]
    return notes


if __name__ == "__main__":
    sys.exit(main())
