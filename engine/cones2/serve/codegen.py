"""Regenerate the checked-in gRPC stubs from `cones2.proto` (needs grpcio-tools).

    python -m cones2.serve.codegen           # rewrite cones2_pb2.py, cones2_pb2.pyi, cones2_pb2_grpc.py
    python -m cones2.serve.codegen --check   # exit 1 if they are not what the proto generates

The proto is compiled as `cones2/serve/cones2.proto` so the generated modules import each other as
`cones2.serve.*` (protoc derives Python imports from the proto's path).
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
PROTO = HERE / "cones2.proto"
OUTPUTS = ("cones2_pb2.py", "cones2_pb2.pyi", "cones2_pb2_grpc.py")


def generate(out_dir: Path) -> list[Path]:
    """Compile the proto; write the three stub files into `out_dir` and return their paths."""
    try:
        from grpc_tools import protoc
    except ImportError:
        raise SystemExit("grpcio-tools is not installed: pip install 'cones2-engine[dev]'") from None
    import importlib.resources

    out_dir = Path(out_dir)
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "src" / "cones2" / "serve"
        src.mkdir(parents=True)
        shutil.copyfile(PROTO, src / PROTO.name)
        gen = Path(tmp) / "gen"
        gen.mkdir()
        well_known = str(importlib.resources.files("grpc_tools") / "_proto")
        rc = protoc.main(["grpc_tools.protoc", f"-I{Path(tmp) / 'src'}", f"-I{well_known}",
                          f"--python_out={gen}", f"--pyi_out={gen}", f"--grpc_python_out={gen}",
                          "cones2/serve/cones2.proto"])
        if rc != 0:
            raise SystemExit(f"protoc failed with exit code {rc}")
        out_dir.mkdir(parents=True, exist_ok=True)
        written = []
        for name in OUTPUTS:
            shutil.copyfile(gen / "cones2" / "serve" / name, out_dir / name)
            written.append(out_dir / name)
    return written


def stale_files(package_dir: Path = HERE) -> list[str]:
    """Names of checked-in stubs that differ from what the proto generates now."""
    with tempfile.TemporaryDirectory() as tmp:
        fresh = generate(Path(tmp))
        return [p.name for p in fresh if not (package_dir / p.name).is_file()
                or (package_dir / p.name).read_bytes() != p.read_bytes()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cones2.serve.codegen", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="only check that the stubs are current")
    args = parser.parse_args(argv)
    if args.check:
        stale = stale_files()
        if stale:
            print(f"stale gRPC stubs: {', '.join(stale)}; run `python -m cones2.serve.codegen`", file=sys.stderr)
            return 1
        print("gRPC stubs are current")
        return 0
    for path in generate(HERE):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
