"""Where one ONNX export of the tiny test model spends its time: torch.export tracing, the ONNX
decompositions, the onnxscript optimizer, the ONNX Runtime fusions, onnx.checker and the verify step,
each as wall and process-CPU seconds (CPU seconds are the figure to compare on a shared machine).

    python bench/export_cost.py [--no-fusions] [--json bench/results/export_cost.json]

Runs `export_engine` as the runtime cache does (fusions on) or as `cones2-engine export onnx` does
(--no-fusions), on a tiny model built in a temporary folder, one thread.
"""
from __future__ import annotations

import argparse
import functools
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness.results import write_result  # noqa: E402


def _timed(table: dict, label: str, fn):
    """`fn`, adding its wall and CPU seconds to table[label] on every call."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        wall, cpu = time.perf_counter(), time.process_time()
        try:
            return fn(*args, **kwargs)
        finally:
            row = table.setdefault(label, {"calls": 0, "wall_s": 0.0, "cpu_s": 0.0})
            row["calls"] += 1
            row["wall_s"] += time.perf_counter() - wall
            row["cpu_s"] += time.process_time() - cpu
    return wrapper


def _instrument(table: dict) -> None:
    """Wrap each phase the export goes through (module attributes the exporter looks up at call time)."""
    import onnx
    import onnxscript.optimizer
    import torch
    from torch.export import ExportedProgram

    from cones2.export import onnx_export, verify

    torch.onnx.export = _timed(table, "torch.onnx.export (all below but fusions)", torch.onnx.export)
    torch.export.export = _timed(table, "  torch.export tracing", torch.export.export)
    ExportedProgram.run_decompositions = _timed(table, "  ONNX decompositions", ExportedProgram.run_decompositions)
    onnxscript.optimizer.optimize_ir = _timed(table, "  onnxscript optimizer", onnxscript.optimizer.optimize_ir)
    onnx.checker.check_model = _timed(table, "onnx.checker", onnx.checker.check_model)
    onnx_export.fuse_for_onnxruntime = _timed(table, "ONNX Runtime fusions", onnx_export.fuse_for_onnxruntime)
    verify.verify_model = _timed(table, "verify (ORT vs PyTorch)", verify.verify_model)


def _node_counts(folder: Path, manifest: dict) -> dict[str, dict[str, int]]:
    """Nodes per op type of each exported graph (what the optimizer and the fusions leave)."""
    import collections

    import onnx

    counts = {}
    for name, entry in manifest["models"].items():
        graph = onnx.load(str(folder / entry["file"]), load_external_data=False).graph
        counts[name] = dict(sorted(collections.Counter(n.op_type for n in graph.node).items()))
    return counts


def headline(payload: dict, load) -> dict:
    """The RESULTS.md row: CPU seconds of the whole export and of its largest phases, with the load."""
    cpu = {k.strip(): v["cpu_s"] for k, v in payload["phases"].items()}
    parts = ", ".join(f"{k} {cpu[k]:.1f}" for k in ("torch.export tracing", "ONNX decompositions",
                                                    "onnxscript optimizer", "ONNX Runtime fusions",
                                                    "verify (ORT vs PyTorch)") if k in cpu)
    return {"area": "ONNX export cost, `TINY`",
            "headline": f"one export of the three graphs: {payload['total']['cpu_s']:.1f} s CPU ({parts}); "
                        f"wall {payload['total']['wall_s']:.0f} s at load {load} (loaded machine: CPU seconds are "
                        "the figure, walls are not)"}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--no-fusions", action="store_true", help="export as `cones2-engine export onnx` does")
    p.add_argument("--json", type=Path, default=None, help="write a results record here")
    args = p.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="export-cost-"))
    os.environ["CONES2_CACHE"] = str(tmp)
    import torch

    torch.set_num_threads(1)
    import cones2
    from cones2.default_model import build_tiny_model
    from cones2.export import onnx_export

    table: dict = {}
    _instrument(table)
    engine = cones2.Engine.from_pretrained(build_tiny_model(tmp / "model"), backend="reference")
    wall, cpu = time.perf_counter(), time.process_time()
    manifest = onnx_export.export_engine(engine, tmp / "onnx", progress=False, ort_fusions=not args.no_fusions)
    total = {"wall_s": round(time.perf_counter() - wall, 2), "cpu_s": round(time.process_time() - cpu, 2)}
    phases = {k: {**v, "wall_s": round(v["wall_s"], 2), "cpu_s": round(v["cpu_s"], 2)} for k, v in table.items()}
    print(f"export total: {total['wall_s']} s wall, {total['cpu_s']} s CPU (load {os.getloadavg()})")
    for label, row in phases.items():
        print(f"  {label:45s} {row['calls']:2d} calls {row['wall_s']:7.2f} s wall {row['cpu_s']:7.2f} s CPU")
    payload = {"total": total, "phases": phases,
               "per_model_export_s": {n: m["export_seconds"] for n, m in manifest["models"].items()},
               "max_abs_err": {n: m["verified"]["max_abs_err"] for n, m in manifest["models"].items()},
               "graph_nodes": _node_counts(tmp / "onnx", manifest)}
    print("graph nodes:", payload["graph_nodes"], "max abs err:", payload["max_abs_err"])
    if args.json:
        load = [round(x, 1) for x in os.getloadavg()]
        write_result(args.json, {"fusions": not args.no_fusions, "threads": 1, "model": "tiny v-prediction D=32"},
                     payload, argv=argv, script="bench/export_cost.py", summaries=[headline(payload, load)])
    return 0


if __name__ == "__main__":
    sys.exit(main())
