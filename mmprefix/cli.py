"""Command line: ``mmprefix sites MODEL`` prints where prefixes go and how big they are."""

from __future__ import annotations

import argparse
import sys

import torch
from torch import nn

from .architectures import Site, find_sites, select_sites
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
        selected = select_sites(find_sites(model, args.target_modules), args.targets)
    except ValueError as err:
        print(f"mmprefix: {err}", file=sys.stderr)
        return 2
    print(format_sites(selected, args.num_virtual_tokens, sum(p.numel() for p in model.parameters())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
