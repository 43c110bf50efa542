"""The same service on Ray Serve: each replica loads the frozen model(s) and the prefix folder, batches its own
requests with mmprefix's `Batcher`, and answers the HTTP API of ``mmprefix serve``; Ray routes requests across
replicas (and machines); each replica batches step by step (``batching="step"``, continuous batching) unless
``batching="request"``. Needs ``pip install "ray[serve]"``.

    serve run mmprefix.serving.ray_serve:build num_replicas=2 prefixes=out rescan_seconds=30

or from Python: ``serve.run(application(num_replicas=2), route_prefix="/")``. Every replica reads the prefix
folder; to add or remove a prefix on all of them, change the folder and let each replica rescan it
(``rescan_seconds``): the admin endpoints reach one replica only, so they are off here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

from ray import serve

from .models import DEFAULT_MODEL, load_engines
from .server import Limits, create_app
from .service import PrefixService


@serve.ingress()
class PrefixReplica:
    """One replica: its own models, prefixes and batchers."""

    def __init__(self, models: Sequence[str], prefixes: str | None, max_batch_size: int, window: float,
                 rescan_seconds: float | None, limits: dict, generation_limits: dict, batching: str = "step") -> None:
        engines = [engine for spec in models for engine in load_engines(spec, **generation_limits)]
        self.service = PrefixService(engines, prefixes, max_batch_size=max_batch_size, window=window, batching=batching)
        self.limits, self.rescan_seconds = Limits(**limits), rescan_seconds

    def __serve_build_asgi_app__(self) -> Any:
        return create_app(self.service, admin_token=None, limits=self.limits, rescan_seconds=self.rescan_seconds)


def application(models: Sequence[str] = (DEFAULT_MODEL,), prefixes: str | None = "out", num_replicas: int = 1,
                max_batch_size: int = 16, window: float = 0.005, rescan_seconds: float | None = None,
                limits: Limits | None = None, max_new_tokens: int = 64, max_beams: int = 4,
                ray_actor_options: dict | None = None, batching: str = "step") -> serve.Application:
    """A Ray Serve application of ``num_replicas`` replicas serving ``models`` and the prefixes in ``prefixes``
    (an absolute path is safest: replicas may run elsewhere). Each replica needs the same files."""
    deployment = serve.deployment(PrefixReplica, name="mmprefix", num_replicas=num_replicas,
                                  ray_actor_options=ray_actor_options or {"num_cpus": 1})
    return deployment.bind(list(models), prefixes, max_batch_size, window, rescan_seconds, asdict(limits or Limits()),
                           {"max_new_tokens": max_new_tokens, "max_beams": max_beams}, batching)


def build(args: dict[str, str]) -> serve.Application:
    """For ``serve run mmprefix.serving.ray_serve:build key=value ...``: ``models`` (comma-separated specs),
    ``prefixes``, ``num_replicas``, ``max_batch_size``, ``window_ms``, ``rescan_seconds``, ``num_cpus``,
    ``batching``."""
    known = {"models", "prefixes", "num_replicas", "max_batch_size", "window_ms", "rescan_seconds", "num_cpus", "batching"}
    unknown = sorted(set(args) - known)
    if unknown:
        raise ValueError(f"unknown argument {unknown[0]!r}; arguments are {sorted(known)}")
    return application(
        models=args.get("models", DEFAULT_MODEL).split(","),
        prefixes=args.get("prefixes", "out"),
        num_replicas=int(args.get("num_replicas", 1)),
        max_batch_size=int(args.get("max_batch_size", 16)),
        window=float(args.get("window_ms", 5)) / 1000,
        rescan_seconds=float(args["rescan_seconds"]) if "rescan_seconds" in args else None,
        ray_actor_options={"num_cpus": float(args.get("num_cpus", 1))},
        batching=args.get("batching", "step"),
    )
