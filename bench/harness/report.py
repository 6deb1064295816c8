"""Plain-text tables of bench/latency.py's results, and a one-line name of the device."""
from __future__ import annotations

import platform

import torch


def _fmt(v, spec=".2f"):
    if v is None:
        return "-"
    return format(v, spec) if isinstance(v, float) else str(v)


def _mb(v):
    return "-" if v is None else f"{v / 2**20:.1f}"


def print_table(title: str, header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    print(f"\n== {title}")
    print("  ".join(h.ljust(w) for h, w in zip(header, widths)))
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)))


def report(results: dict) -> None:
    """Print the stage, attention and end-to-end tables of one latency run."""
    meta = results["meta"]
    print(f"cones2 latency: {meta['model']} at {meta['resolution']} px, {meta['steps']} steps "
          f"(G={meta['guidance_steps']}, {meta['mode']}), {meta['subjects']} subjects, {meta['dtype']} on "
          f"{meta['device_name']}")
    print(f"command: {meta['command']}")
    for name, why in results["skipped"].items():
        print(f"skipped {name}: {why}")
    print_table("stages (ms, fastest of the timed runs)", ["stage", "ms", "UNet calls"],
                [[r["stage"], _fmt(r["min_ms"]), _fmt(r["unet_calls"])] for r in results["stages"]])
    if results["attention"]:
        print_table("guided cross-attention, SD 2.1 768-px shapes (ratio = time / plain SDPA of the same shape)",
                    ["shape", "implementation", "ms", "ratio", "peak MiB"],
                    [[r["shape"], r["impl"], _fmt(r["min_ms"], ".3f"), _fmt(r["ratio_vs_sdpa_plain"]),
                      _mb(r["peak_bytes"])] for r in results["attention"]])
    print_table("end-to-end generation (ms per image; speedups vs the paper-style paths of this run)",
                ["backend", "guided", "ms", "UNet calls x batch", "vs paper-style", "vs paper-style fp32",
                 "guided/unguided", "peak MiB"],
                [[r["backend"], "yes" if r["guided"] else "no", _fmt(r["min_ms"], ".1f"),
                  f"{r['unet_calls']} x {r['unet_batch']}", _fmt(r["speedup_vs_paper_style"]),
                  _fmt(r.get("speedup_vs_official_fp32")), _fmt(r["guided_over_unguided"]), _mb(r["peak_bytes"])]
                 for r in results["end_to_end"]])


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU model and torch's thread count."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or "cpu"
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), model)
    except OSError:
        pass
    return f"{model} ({torch.get_num_threads()} threads)"
