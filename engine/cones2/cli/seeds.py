"""`--seed` lists and ranges, `--num-images`, and the file each seed's image is written to."""
from __future__ import annotations

from pathlib import Path

from .. import limits
from ..errors import Cones2Error, quote

MAX_IMAGES = 1000
MAX_SEED = 2**63 - 1


def add_seed_flags(p) -> None:
    """--seed and --num-images (`generate` and `client generate` share the rule: `choose_seeds`)."""
    p.add_argument("--seed", metavar="SEEDS", help="a seed, a list (1,2,5) or a range (10-13); default 0")
    p.add_argument("--num-images", type=int, metavar="N",
                   help="images to make: with one --seed S, seeds S..S+N-1 (default: one per seed)")


def parse_seeds(text: str) -> list[int]:
    """"5", "1,2,7" or "10-13" (inclusive), mixed freely ("0,4-6"); each seed in [0, 2**63 - 1]."""
    seeds: list[int] = []
    for part in str(text).split(","):
        low, sep, high = part.strip().partition("-")
        try:
            if not low.strip():          # "-5": one (negative) seed, refused by its bounds below
                first = last = int(part)
            else:
                first = int(low)
                last = int(high) if sep else first
        except ValueError:
            raise Cones2Error(f"expected seeds such as 7, 1,2,3 or 10-13, got {quote(text)}", "--seed") from None
        if last < first:
            raise Cones2Error(f"range {part.strip()} runs backwards", "--seed")
        if len(seeds) + last - first + 1 > MAX_IMAGES:
            raise Cones2Error(f"more than {MAX_IMAGES} seeds", "--seed")
        limits.integer(first, "seed", 0, MAX_SEED)
        seeds.extend(limits.integer(s, "seed", 0, MAX_SEED) for s in range(first, last + 1))
    if len(set(seeds)) != len(seeds):
        raise Cones2Error(f"repeats a seed in {quote(text)}", "--seed")
    return seeds


def choose_seeds(seed_text: str | None, num_images: int | None, base_seed: int = 0) -> list[int]:
    """The seeds of this run: the `--seed` list; one seed with `--num-images N` counts up from it;
    neither flag: `base_seed` (a config's or an image's, else 0)."""
    if num_images is not None:
        limits.integer(num_images, "--num-images", 1, MAX_IMAGES)
    seeds = parse_seeds(seed_text) if seed_text is not None else [base_seed]
    if num_images is None or num_images == len(seeds):
        return seeds
    if len(seeds) == 1:
        if seeds[0] + num_images - 1 > MAX_SEED:
            raise Cones2Error(f"seeds from {seeds[0]} for {num_images} images pass {MAX_SEED}", "--seed")
        return list(range(seeds[0], seeds[0] + num_images))
    raise Cones2Error(f"{len(seeds)} seeds given but --num-images {num_images}", "--num-images")


def per_seed(path: Path, seed: int, many: bool) -> Path:
    """`path` itself for a single image; `stem-SEED.suffix` (`out-7.png`) when a run makes several."""
    if not many:
        return path
    name = path.name[: -len(path.suffix)] if path.suffix else path.name
    if name.endswith(".preview"):
        return path.with_name(f"{name[: -len('.preview')]}-{seed}.preview{path.suffix}")
    return path.with_name(f"{name}-{seed}{path.suffix}")
