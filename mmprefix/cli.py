"""Command line: ``mmprefix sites MODEL`` prints where prefixes go and how big they are; ``mmprefix serve``
serves prefixes on a frozen model over HTTP (the ``serve`` extra: ``pip install 'mmprefix[serve]'``).

For ``sites``, MODEL is what the recipes accept: a Hugging Face id, a local folder with ``config.json``, or ``embedded:NAME[:HEAD]``
(the tiny backbones shipped with mmprefix). Only the config is read; the model is built on the meta device, so no
weights are read or downloaded. torch and transformers load after the arguments are read, so ``--help`` and
argument errors answer at once.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Callable
from typing import Any

from .core.config import PrefixConfig
from .defaults import DEFAULT_MODEL


DEFAULT_PREFIXES = "out"  # where the recipes write their runs


class CommandError(Exception):
    """A problem the user can fix; printed as one line."""


def build_skeleton(spec: str) -> Any:
    """The model's architecture from its config alone, on the meta device: no weights are read or downloaded."""
    import torch
    import transformers

    if spec.startswith("embedded:"):
        from .embedded import backbone, backbone_dir

        _, name, *head = spec.split(":")
        try:
            folder, heads = backbone_dir(name), backbone(name).heads
        except ValueError as err:
            raise CommandError(str(err)) from None
        if head and head[0] not in heads:
            raise CommandError(f"backbone {name!r} has heads {sorted(heads)}, not {head[0]!r}")
        config, cls = transformers.AutoConfig.from_pretrained(folder), heads[head[0] if head else next(iter(heads))]
    else:
        config = _config(spec)
        architectures = getattr(config, "architectures", None) or []
        cls = getattr(transformers, architectures[0], None) if architectures else None
    with torch.device("meta"):
        if cls is None:
            return transformers.AutoModel.from_config(config)
        return cls._from_config(config)


def _config(spec: str) -> Any:
    """A model config from a folder, the local cache, or the hub (not when offline): one line when it fails."""
    import transformers

    from .models.loading import first_line, offline

    local = os.path.isdir(spec)
    if not local and spec.startswith((".", "/", "~")):
        raise CommandError(f"{spec} does not exist (give a Hugging Face id, a model folder or embedded:NAME)")
    if local and not os.path.isfile(os.path.join(spec, "config.json")):
        raise CommandError(f"{spec} is a folder without config.json, not a model folder (give a Hugging Face id, a "
                           "model folder or embedded:NAME)")
    try:
        return transformers.AutoConfig.from_pretrained(spec, local_files_only=local or offline())
    except (OSError, ValueError) as err:
        where = " (offline: HF_HUB_OFFLINE is set and it is not in the local cache)" if offline() and not local else ""
        raise CommandError(f"cannot read a model config from {spec!r}{where}: {first_line(err)}") from None


def format_sites(sites: list, num_virtual_tokens: int, total_parameters: int | None = None) -> str:
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


def _bounded(least: float, most: float | None = None, kind: type = int) -> Callable[[str], Any]:
    """An argparse type: a finite number (a whole one for ``kind=int``) from ``least`` to ``most``, else one line."""
    what = "a whole number" if kind is int else "a number"

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if not math.isfinite(value) or value < least or (most is not None and value > most):
            bounds = f"from {least} to {most}" if most is not None else f">= {least}"
            raise argparse.ArgumentTypeError(f"expected {what} {bounds}, got {text}")
        return value

    return parse


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mmprefix", description="Prefix tuning for frozen vision-language models.")
    commands = parser.add_subparsers(dest="command", required=True, help="what to do")
    sites = commands.add_parser("sites", help="list the attention sites of a model and their prefix sizes",
                                description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sites.add_argument("model", help="Hugging Face id, local folder with config.json, or embedded:NAME[:HEAD]")
    sites.add_argument("-p", "--num-virtual-tokens", type=_bounded(1), default=PrefixConfig.num_virtual_tokens,
                       metavar="P", help="prefix length used for the sizes (default: %(default)s)")
    sites.add_argument("--targets", nargs="+", help="e.g. vision.self 'lm.self[-4:]' (default: all)")
    sites.add_argument("--target-modules", nargs="+", help="regular expressions on module names")
    add_serve_parser(commands)
    commands.add_parser("eval", add_help=False, help="evaluate a model with its prefixes on a benchmark (mmprefix eval "
                                                     "--help: its own options)")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["eval"]:  # the evaluation harness has its own options (eval/evaluate.py is the same command)
        from .experiment.evaluate import main as evaluate

        return evaluate(argv[1:])
    args = build_parser().parse_args(argv)
    if args.command == "serve":
        return serve(args)
    from .core.architectures import scan  # torch loads from here on
    from .core.targets import select_sites

    try:
        model = build_skeleton(args.model)
        available, unused = scan(model, args.target_modules)
        selected = select_sites(available, args.targets)
    except (CommandError, ValueError) as err:
        print(f"mmprefix: {err}", file=sys.stderr)
        return 2
    print(format_sites(selected, args.num_virtual_tokens, sum(p.numel() for p in model.parameters())))
    for line in coverage_notes(model, available, unused):
        print(line)
    return 0


def coverage_notes(model: Any, sites: list, unused: dict[str, str]) -> list[str]:
    """Which record covers the model (or that the generic fallback named its towers), and what was left out."""
    from .core.architectures import model_class, tower_layout, unreachable_towers
    from .core.reach import unread_attention

    layout = tower_layout(model)
    if layout is None:
        notes = ["towers: none known (sites chosen by target_modules, in one tower called 'model')"]
    elif layout.fallback:
        notes = ["towers: generic fallback (no tested record for this family; towers named after its sub-models)"]
        _, why_not = unread_attention(model_class(model), model, [site.name for site in sites])
        if why_not:
            notes.append(f"not checked: whether the model reads every vision attention's output ({why_not})")
    else:
        notes = [f"towers: the tested record of family {layout.family.name!r}"]
    notes += [f"left out: {name}: {why}" for name, why in unused.items()]
    notes += [f"unreachable: the {tower!r} tower ({why})" for tower, why in unreachable_towers(model, sites).items()]
    return notes


def add_serve_parser(commands: argparse._SubParsersAction) -> None:
    serve = commands.add_parser("serve", help="serve prefixes on a frozen model over HTTP (OpenAI-compatible)",
                                description="With no arguments: the embedded tiny BLIP (VQA and captioning) and the "
                                            "prefixes the recipes wrote under ./out, on http://127.0.0.1:8000")
    serve.add_argument("--model", action="append", dest="models", metavar="SPEC",
                       help="embedded:NAME[:HEAD], a local folder, a Hugging Face id or open_clip:MODEL[:PRETRAINED]; "
                            f"repeat for several (default: {DEFAULT_MODEL})")
    serve.add_argument("--prefixes", help=f"folder of prefix folders, each named after its folder (default: "
                                          f"{DEFAULT_PREFIXES}, if it exists)")
    serve.add_argument("--host", default="127.0.0.1", help="interface to listen on (default: loopback only)")
    serve.add_argument("--port", type=_bounded(0, 65535), default=8000)
    serve.add_argument("--admin-token", default=os.environ.get("MMPREFIX_ADMIN_TOKEN"),
                       help="enables /admin/* for this bearer token (default: $MMPREFIX_ADMIN_TOKEN; none: off)")
    serve.add_argument("--rescan-seconds", type=_bounded(0.001, kind=float), help="rescan the prefix folder this often")
    serve.add_argument("--max-batch-size", type=_bounded(1), default=16,
                       help="the most rows decoding (or requests batched) at once")
    serve.add_argument("--window-ms", type=_bounded(0, kind=float), default=5.0,
                       help="how long a request waits for others to join it")
    serve.add_argument("--batching", choices=("step", "request"), default="step",
                       help="step: requests join and leave the running batch at every decoding step (continuous "
                            "batching); request: a batch is formed once and runs to its end")
    serve.add_argument("--max-new-tokens", type=_bounded(1), default=64, help="the most a request may ask for")
    serve.add_argument("--max-beams", type=_bounded(1), default=4, help="the most num_beams a request may ask for")
    serve.add_argument("--max-input-tokens", type=_bounded(1), default=256)
    serve.add_argument("--max-input-chars", type=_bounded(1), help="the longest text, checked before it is tokenised "
                                                                 "(default: 16 x --max-input-tokens)")
    serve.add_argument("--max-image-bytes", type=_bounded(1), default=10 * 2**20)
    serve.add_argument("--max-image-pixels", type=_bounded(1), default=4096 * 4096)
    serve.add_argument("--max-body-bytes", type=_bounded(1), default=16 * 2**20)


def serve(args: argparse.Namespace) -> int:
    try:
        from .serving.server import Limits, run
    except ImportError as err:
        print(f"mmprefix serve needs the serve extra (pip install 'mmprefix[serve]'): {err}", file=sys.stderr)
        return 2
    from .models.loading import LoadError

    prefixes = args.prefixes or DEFAULT_PREFIXES
    if not os.path.isdir(prefixes):
        if args.prefixes is not None:  # a mistyped folder must not serve the base model without a word
            print(f"mmprefix serve: --prefixes {prefixes} is not a folder (give the folder that holds the prefix "
                  "folders, e.g. a recipe's out/)", file=sys.stderr)
            return 2
        print(f"mmprefix serve: no folder {prefixes} here (the default --prefixes): serving the base model alone; "
              "prefixes saved there later come with --rescan-seconds or POST /admin/rescan", file=sys.stderr)
    limits = Limits(max_body_bytes=args.max_body_bytes, max_image_bytes=args.max_image_bytes,
                    max_image_pixels=args.max_image_pixels, max_input_tokens=args.max_input_tokens,
                    max_input_chars=args.max_input_chars)
    try:
        run(args.models or [DEFAULT_MODEL], prefixes, host=args.host, port=args.port, admin_token=args.admin_token,
            max_batch_size=args.max_batch_size, window=args.window_ms / 1000, rescan_seconds=args.rescan_seconds,
            limits=limits, max_new_tokens=args.max_new_tokens, max_beams=args.max_beams, batching=args.batching)
    except (LoadError, ValueError) as err:
        print(f"mmprefix serve: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
