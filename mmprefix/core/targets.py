"""Which sites a prefix goes to: ``PrefixConfig.targets`` strings (``"tower.kind[start:stop]"``, shell wildcards)
matched against the sites `architectures.find_sites` found."""

from __future__ import annotations

import re
from fnmatch import fnmatchcase
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .architectures import Site

_TARGET = re.compile(r"(?P<tower>[\w*?]+)(?:\.(?P<kind>[\w*?]+))?(?P<slice>\[(?P<start>-?\d+)?:(?P<stop>-?\d+)?\])?")


def select_sites(sites: list[Site], targets: list[str] | None) -> list[Site]:
    """The sites selected by ``PrefixConfig.targets`` strings (``"tower.kind[start:stop]"``, shell wildcards)."""
    if targets is None:
        return list(sites)
    valid = ", ".join(sorted({f"{s.tower}.{s.kind}" for s in sites}))
    chosen: set[str] = set()
    for target in targets:
        match = _TARGET.fullmatch(target.strip())
        if match is None:
            raise ValueError(f"cannot parse target {target!r}: expected 'tower', 'tower.kind' or 'tower.kind[start:stop]'")
        tower, kind = match["tower"], match["kind"] or "*"
        hits = [s for s in sites if fnmatchcase(s.tower, tower) and fnmatchcase(s.kind, kind)]
        if not hits:
            raise ValueError(f"target {target!r} matches no attention site; valid targets for this model: {valid}")
        if match["slice"]:
            layer_slice = slice(int(match["start"]) if match["start"] else None, int(match["stop"]) if match["stop"] else None)
            layers = {t: sorted({s.layer for s in hits if s.tower == t}) for t in {s.tower for s in hits}}
            hits = [s for s in hits if s.layer in layers[s.tower][layer_slice]]
            if not hits:
                counts = ", ".join(f"{t} has {len(v)}" for t, v in sorted(layers.items()))
                raise ValueError(f"target {target!r} selects no layer ({counts}; the slice counts layers from 0, "
                                 "negative from the last)")
        chosen.update(s.name for s in hits)
    return [s for s in sites if s.name in chosen]
