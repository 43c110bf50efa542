"""Tables and figures of the methods sweep (``benchmarks/methods.py --sweep``): written into its folder."""

from __future__ import annotations


def write(sweep) -> None:
    """Placeholder until the report is written."""
