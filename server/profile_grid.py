"""The grids `adrenaline profile` measures and its flags, apart from the measuring
(server/profile.py), so that the CLI's parser and the simulator read them without torch.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass


@dataclass(frozen=True)
class Grid:
    batches: tuple[int, ...]
    context: tuple[int, ...]  # tokens per request
    prompts: tuple[int, ...]  # prefill sizes
    steps: int  # timed repetitions per point


GRIDS = {
    # Prompts from a few tokens up: a short prompt's step is mostly the fixed cost.
    "full": Grid((1, 4, 16, 32), (64, 256, 1024), (16, 64, 256, 1024, 2048), 8),
    "quick": Grid((1, 4, 16), (32, 128, 512), (16, 64, 128, 512), 8),
    "tiny": Grid((1, 4), (16, 64), (16, 32, 64), 2),  # for tests: seconds, not a usable profile
}


def add_profile_flags(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("profile")
    g.add_argument("--output", required=True, metavar="FILE.json")
    g.add_argument("--quick", action="store_true", help="a small grid (under a minute on CPU)")
    g.add_argument("--grid", choices=sorted(GRIDS), default=None, help=argparse.SUPPRESS)
    g.add_argument(
        "--torch-threads",
        type=int,
        default=0,
        help="CPU threads, as a worker will have them (0: torch's default)",
    )
