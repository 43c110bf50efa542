"""The compatibility table: every class of the family matrix, its sites per tower and kind, and which checks pass.

    python benchmarks/compatibility.py            # runs tests/core/test_families.py, prints the Markdown table

The table is the family matrix's own results (pytest runs it in this process and records each outcome), so
it says exactly what the tests check, on the installed transformers version: sites with the expected towers,
kinds and layers; a prefix changes the output and ``disable_prefix()`` (or zero slots) gives the untouched
model bit for bit; gradients reach every prefix tensor and no base weight; per-row routing equals each row
alone; greedy and beam generation, with and without the KV cache, equal a full recompute; routed generation;
save/load; ``init="text"`` through the family's processor; a soft prompt equal to the same vectors read as
tokens. "-" marks a check that does not apply (no generation, no text input).
"""

from __future__ import annotations

import collections
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

# test function -> column
CHECKS = {
    "test_sites_have_the_expected_towers_kinds_and_layers": "sites found",
    "test_a_prefix_changes_the_output_and_disabled_or_empty_is_the_untouched_model": "forward, disabled",
    "test_gradients_reach_every_prefix_tensor_and_nothing_else": "gradients",
    "test_each_row_of_a_routed_batch_equals_that_row_alone": "routed rows",
    "test_greedy_generation_with_and_without_cache_equals_a_full_recompute_loop": "greedy",
    "test_beam_search_scores_with_and_without_cache_equal_a_full_recompute": "beam",
    "test_routed_generation_gives_each_row_what_it_gets_alone": "routed generation",
    "test_save_and_load_reproduce_the_outputs": "save/load",
    "test_text_initialisation_through_the_family_processor_reaches_every_site": "init text",
    "test_a_soft_prompt_equals_the_same_vectors_read_as_tokens": "soft prompt",
    # tests/core/test_media_routing.py: several images in a row, text-only rows, images of other sizes, image + video
    "test_each_row_sees_its_own_prefix_in_every_tower_or_the_call_is_refused": "mixed media rows",
    "test_generation_keeps_each_rows_prefix_through_the_cache_and_the_beams": "mixed media generation",
}
MEDIA_TESTS = ("test_each_row_sees_its_own_prefix_in_every_tower_or_the_call_is_refused",
               "test_generation_keeps_each_rows_prefix_through_the_cache_and_the_beams")


class Outcomes:
    """A pytest plugin that records each matrix test's outcome by (check, family)."""

    def __init__(self) -> None:
        self.results: dict[tuple[str, str], list[bool]] = collections.defaultdict(list)

    def pytest_runtest_logreport(self, report) -> None:
        if report.when != "call" and not (report.when == "setup" and report.failed):
            return
        function, _, parameters = report.nodeid.split("::")[-1].partition("[")
        if function in CHECKS:  # ids: "a-b-llava" (family matrix), "llava-two_images-a-b" (media routing)
            parts = parameters.rstrip("]").split("-")
            family = parts[0] if function in MEDIA_TESTS else parts[-1]
            self.results[(CHECKS[function], family)].append(report.passed)


def sites_text(sites: dict) -> str:
    counts = {key: len(value) if isinstance(value, list) else value for key, value in sites.items()}
    return ", ".join(f"{tower}.{kind} {n}" for (tower, kind), n in sorted(counts.items()))


def main() -> int:
    import tiny_families
    import transformers

    outcomes = Outcomes()
    from mmprefix.core.architectures import tower_layout

    tests = [str(ROOT / "tests" / f) for f in ("test_families.py", "test_media_routing.py")]
    code = pytest.main([*tests, "-q", "-p", "no:cacheprovider"], plugins=[outcomes])
    columns = list(CHECKS.values())
    lines = [
        f"transformers {transformers.__version__}; tiny configs, tests/core/test_families.py and tests/core/test_media_routing.py",
        "",
        "| family | class | covered by | sites (tower.kind count) | " + " | ".join(columns) + " | notes |",
        "|---|---|---|---|" + "---|" * (len(columns) + 1),
    ]
    for name, case in sorted(tiny_families.CASES.items()):
        cells = []
        for column in columns:
            runs = outcomes.results.get((column, name))
            cells.append("-" if not runs else "pass" if all(runs) else "FAIL")
        model = case.build()
        layout = tower_layout(model)
        covered = "generic fallback" if layout is None or layout.fallback else f"record `{layout.family.name}`"
        notes = [f"prefixes target {', '.join(case.targets)} (the other tower is refused)"] if case.targets else []
        notes += [f"per-row routing reaches {', '.join(case.routable)} only"] if case.routable else []
        notes += ["transformers' own beam search fails on this class"] if not case.beams else []
        lines.append(f"| {name} | `{type(model).__name__}` | {covered} | {sites_text(case.sites)} | "
                     + " | ".join(cells) + f" | {'; '.join(notes)} |")
    print("\n".join(lines))
    return int(code)


if __name__ == "__main__":
    sys.exit(main())
