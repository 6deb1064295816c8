"""Issue 24's residual bound: `fast`'s exact-instance rates against paper-exact's, on the same seeds.

Reads demo-world evaluation records (bench/quality.py or bench/fast_quality.py with residuals), pools
each side's records (seed ranges that must not overlap, and must be the same on both sides), and
prints per figure: successes / generations on each side, the gap (fast - paper-exact), its 95%
interval (Newcombe's score interval for a difference of two proportions), and whether the gap is
within the bound from below (fast may be better by any amount).

    python bench/residual_gap.py --fast F.json [F2.json ...] --paper-exact P.json [P2.json ...] \\
        --bound 0.03 --json bench/results/fast_reuse/residual_gap.json
"""
from __future__ import annotations

import argparse
import math
import sys

from harness.results import read_result, write_result

from cones2_train.demo_world.evaluation import exact_rates

Z95 = 1.959964


def seeds(record: dict) -> range:
    s = record["payload"]["settings"]
    first = s.get("first_residual_prompt", 0)
    return range(first, first + s["residual_prompts"])


def pooled(paths: list[str]) -> tuple[dict[str, tuple[int, int]], list[range]]:
    """Per figure (successes, generations) over the records, and their seed ranges in order."""
    counts: dict[str, tuple[int, int]] = {}
    ranges = []
    for path in paths:
        record = read_result(path)
        span = seeds(record)
        if any(set(span) & set(r) for r in ranges):
            raise SystemExit(f"residual_gap: error: {path}: seeds {span.start}-{span.stop - 1} overlap another record's")
        ranges.append(span)
        for name, rate in exact_rates(record["payload"]["residuals"]).items():
            k, n = counts.get(name, (0, 0))
            counts[name] = (k + round(rate * len(span)), n + len(span))
    partial = [name for name, (_, n) in counts.items() if n != sum(len(r) for r in ranges)]
    if partial:
        raise SystemExit(f"residual_gap: error: {', '.join(partial)}: not in every record of {', '.join(paths)}")
    return counts, sorted(ranges, key=lambda r: r.start)


def wilson(k: int, n: int) -> tuple[float, float]:
    p, z2 = k / n, Z95 * Z95
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = Z95 * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return centre - half, centre + half


def gap_interval(k1: int, n1: int, k2: int, n2: int) -> tuple[float, float]:
    """95% interval of p1 - p2 (Newcombe 1998, method 10: from the two Wilson intervals)."""
    p1, p2 = k1 / n1, k2 / n2
    (l1, u1), (l2, u2) = wilson(k1, n1), wilson(k2, n2)
    d = p1 - p2
    return d - math.sqrt((p1 - l1) ** 2 + (u2 - p2) ** 2), d + math.sqrt((u1 - p1) ** 2 + (p2 - l2) ** 2)


def spans(ranges: list[range]) -> list[tuple[int, int]]:
    """Sorted seed ranges as (first, last) spans, adjacent ones merged: one record of seeds 0-399 ran the
    same seeds as three of 0-199, 200-299 and 300-399."""
    out: list[tuple[int, int]] = []
    for r in sorted(ranges, key=lambda r: r.start):
        if out and r.start == out[-1][1] + 1:
            out[-1] = (out[-1][0], r.stop - 1)
        else:
            out.append((r.start, r.stop - 1))
    return out


def compare(fast: list[str], paper: list[str], bound: float) -> dict:
    (fc, franges), (pc, pranges) = pooled(fast), pooled(paper)
    if spans(franges) != spans(pranges):
        raise SystemExit("residual_gap: error: the two sides ran different seeds: "
                         f"fast {spans(franges)}, paper-exact {spans(pranges)}")
    missing = [name for name in fc if name not in pc]
    if missing:
        raise SystemExit(f"residual_gap: error: the paper-exact records have no {', '.join(missing)}")
    rows = []
    for name in fc:
        (k1, n1), (k2, n2) = fc[name], pc[name]
        low, high = gap_interval(k1, n1, k2, n2)
        gap = k1 / n1 - k2 / n2
        rows.append({"figure": name, "fast": [k1, n1], "paper_exact": [k2, n2], "gap": gap,
                     "ci95": [low, high], "within": gap >= -bound - 1e-12})
    return {"bound": bound, "seeds": [list(span) for span in spans(franges)], "rows": rows,
            "all_within": all(r["within"] for r in rows), "fast_setting": setting(fast[0])}


def setting(path: str) -> str:
    """steps/guided/gate/interval of a fast record (bench/fast_quality.py's point)."""
    s = read_result(path)["payload"]["settings"]
    return "/".join(str(s.get(k)) for k in ("steps", "guidance_steps", "gate_step", "cache_interval"))


def table(result: dict) -> str:
    lines = [f"| figure | fast | paper-exact | gap | 95% interval | no more than {result['bound']} below |",
             "|---|---:|---:|---:|---|---|"]
    for r in result["rows"]:
        (k1, n1), (k2, n2) = r["fast"], r["paper_exact"]
        lines.append(f"| {r['figure']} | {k1}/{n1} = {k1 / n1:.3f} | {k2}/{n2} = {k2 / n2:.3f} | {r['gap']:+.3f} "
                     f"| {r['ci95'][0]:+.3f} .. {r['ci95'][1]:+.3f} | {'yes' if r['within'] else '**no**'} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--fast", nargs="+", required=True, help="fast-mode records (residual figures)")
    p.add_argument("--paper-exact", nargs="+", required=True, help="paper-exact records on the same seeds")
    p.add_argument("--bound", type=float, default=0.03, help="how far below paper-exact a rate may be")
    p.add_argument("--json", help="write a results record here")
    args = p.parse_args(argv)
    result = compare(args.fast, args.paper_exact, args.bound)
    print(table(result))
    within = sum(r["within"] for r in result["rows"])
    print(f"{within} of {len(result['rows'])} figures within {args.bound} of paper-exact (seeds "
          + ", ".join(f"{a}-{b}" for a, b in result["seeds"]) + ")")
    if args.json:
        worst = min(result["rows"], key=lambda r: r["gap"])
        write_result(args.json, {"fast": args.fast, "paper_exact": args.paper_exact, "bound": args.bound}, result,
                     argv=argv, script="bench/residual_gap.py",
                     summaries=[{"area": "fast-mode residual exact-instance rates vs paper-exact, demo model",
                                 "headline": f"fast {result['fast_setting']}, seeds "
                                             + ", ".join(f"{a}-{b}" for a, b in result["seeds"])
                                             + f": {within}/{len(result['rows'])} figures within {args.bound}; "
                                             f"largest shortfall {worst['figure']} {worst['gap']:+.3f}",
                                 "details": "../../docs/speed.md"}])
    return 0


if __name__ == "__main__":
    sys.exit(main())
