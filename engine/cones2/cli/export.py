"""`cones2-engine export onnx|tensorrt`: compile a checkpoint ahead of time (see docs/export.md).

`export onnx` writes unet.onnx (layout weights as dynamic inputs), text_encoder.onnx,
vae_decoder.onnx and manifest.json, each checked and compared with PyTorch in ONNX Runtime;
`export tensorrt` builds <model>.plan engines from such a directory with min/opt/max profiles.
"""
from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("export", help="export ONNX graphs / build TensorRT engines", description=__doc__)
    targets = p.add_subparsers(dest="target", required=True, metavar="TARGET")

    o = targets.add_parser("onnx", help="export UNet, text encoder and VAE decoder to ONNX")
    o.add_argument("--model", help="diffusers-layout SD checkpoint dir or hub id (default: the embedded model)")
    o.add_argument("--out", required=True, help="directory to write (must be new or empty)")
    o.add_argument("--opset", type=int, default=18, help="ONNX opset, >= 18 (default: 18)")
    o.add_argument("--dtype", default="fp32", choices=["fp32", "fp16"],
                   help="weights and activations (default: fp32); the layout rectification stays fp32 in the graph")
    o.add_argument("--static-shape", metavar="HxW", help="fix the output size in pixels (batch stays dynamic)")
    o.add_argument("--no-verify", action="store_true", help="skip the ONNX Runtime vs PyTorch parity check")
    o.add_argument("--ort-fusions", action="store_true",
                   help="fuse the UNet's attention for ONNX Runtime (faster there; TensorRT then refuses the "
                        "graphs); `onnxruntime`'s cached export is made this way")
    o.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    o.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    o.set_defaults(run=run_onnx)

    t = targets.add_parser("tensorrt", help="build TensorRT engines from an ONNX export")
    t.add_argument("--onnx", required=True, help="directory written by `export onnx`")
    t.add_argument("--out", required=True, help="directory to write (must be new or empty)")
    t.add_argument("--fp16", action="store_true",
                   help="FP16 kernels for an fp32 export (classic TensorRT only); an fp16 export is always built fp16")
    for corner, default in (("min", "1 image at half the training size"), ("opt", "1 image at the training size"),
                            ("max", "4 images at 1.5x the training size")):
        t.add_argument(f"--{corner}", metavar="IMAGESxHxW", help=f"profile {corner} (default: {default})")
    t.add_argument("--flavour", default="tensorrt", choices=["tensorrt", "tensorrt-rtx"],
                   help="classic TensorRT (data-centre GPUs; default) or TensorRT-RTX (RTX GPUs; builds without a GPU)")
    t.add_argument("--models", help="comma-separated subset of unet,text_encoder,vae_decoder (default: all)")
    t.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    t.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    t.set_defaults(run=run_tensorrt)


def run_onnx(args) -> int:
    from cones2.export.onnx_export import export_onnx

    manifest = export_onnx(args.model, args.out, opset=args.opset, dtype=args.dtype, static_shape=args.static_shape,
                           verify=not args.no_verify, progress=not args.no_progress, overwrite=args.overwrite,
                           ort_fusions=args.ort_fusions)
    print(f"wrote {args.out}: {', '.join(e['file'] for e in manifest['models'].values())} + manifest.json "
          f"(model {manifest['model_id']}, opset {manifest['opset']}, {manifest['dtype']})")
    for name, entry in manifest["models"].items():
        check = entry.get("verified")
        if check:
            live = f", layout inputs live: {check['layout_inputs_live']}" if "layout_inputs_live" in check else ""
            print(f"  {name}: ONNX Runtime vs PyTorch max abs err {check['max_abs_err']:.3g} "
                  f"(tolerance {check['tolerance']:.3g}){live}")
    return 0


def run_tensorrt(args) -> int:
    from cones2.export.contracts import ShapePoint
    from cones2.export.trt_build import build_engines

    corners = {c: ShapePoint.parse(getattr(args, c), c) if getattr(args, c) else None for c in ("min", "opt", "max")}
    models = [m.strip() for m in args.models.split(",") if m.strip()] if args.models else None
    manifest = build_engines(args.onnx, args.out, flavour=args.flavour, fp16=args.fp16, low=corners["min"],
                             opt=corners["opt"], high=corners["max"], models=models,
                             progress=not args.no_progress, overwrite=args.overwrite)
    print(f"wrote {args.out}: {', '.join(e['file'] for e in manifest['models'].values())} + manifest.json "
          f"({manifest['flavour']} {manifest['tensorrt_version']}, profile {manifest['profile']['min']} .. "
          f"{manifest['profile']['max']}, opt {manifest['profile']['opt']})")
    return 0
