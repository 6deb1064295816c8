"""`cones2-engine client`: call a running `cones2-engine serve` (generate, register, list, delete, info).

    cones2-engine client generate --prompt "a dog and a mug" --box dog=0.05,0.35,0.5,0.95 \\
        --subject dog=dog.safetensors --out out.png
    cones2-engine client register dog.safetensors        # prints the residual id
"""
from __future__ import annotations

import argparse
import sys

from ..atomic import atomic_write
from ..errors import Cones2Error
from ..limits import LAYOUT_RESIZES
from ..outputs import output_file
from .common import add_mode_flag, key_value, numbers
from .seeds import add_seed_flags, choose_seeds, per_seed


def register(sub) -> None:
    p = sub.add_parser("client", help="call a cones2-engine server", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    conn = argparse.ArgumentParser(add_help=False)
    conn.add_argument("--target", default="127.0.0.1:50051", help="server host:port (default: %(default)s)")
    conn.add_argument("--token-file", help="file holding the server's bearer token")
    conn.add_argument("--tls", action="store_true", help="connect with TLS (system CA roots)")
    conn.add_argument("--tls-ca", help="PEM file of the CA that signed the server certificate (implies --tls)")
    conn.add_argument("--timeout", type=float, default=None, help="deadline per call in seconds")
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")

    g = actions.add_parser("generate", parents=[conn], help="generate an image and write it")
    g.add_argument("--prompt", required=True)
    g.add_argument("--negative-prompt", default="", help="what classifier-free guidance steers away from")
    g.add_argument("--subject", action="append", default=[], metavar="NAME=FILE_OR_ID",
                   help="residual for a word: a local .safetensors/.pt file (sent inline) or a registered id")
    g.add_argument("--position", action="append", default=[], metavar="NAME=IDX[,IDX]",
                   help="explicit token position(s) for a subject's residual")
    g.add_argument("--box", action="append", default=[], metavar="NAME=x0,y0,x1,y1", help="layout box in [0, 1]")
    g.add_argument("--strength", action="append", default=[], metavar="NAME=W", help="layout strength w+")
    g.add_argument("--color-map", metavar="PNG", help="flat-colour layout image (instead of --box)")
    g.add_argument("--color", action="append", default=[], metavar="COLOR=NAME[:W]",
                   help="colour-map entry, e.g. '#ff0000=dog:2.5' or '255,0,0=dog'")
    add_seed_flags(g)
    g.add_argument("--steps", type=int)
    g.add_argument("--guidance-steps", type=int)
    g.add_argument("--guidance-weight", type=float)
    g.add_argument("--cfg", type=float)
    g.add_argument("--negative-weight", type=float)
    g.add_argument("--resolution", type=int, help="square output size")
    g.add_argument("--width", type=int)
    g.add_argument("--height", type=int)
    add_mode_flag(g)
    g.add_argument("--layout-resize", choices=LAYOUT_RESIZES)
    g.add_argument("--out", default="out.png",
                   help="where to write: .png, or .safetensors for raw latents (with several seeds OUT-SEED.png)")
    g.add_argument("--stream", action="store_true", help="use GenerateStream and print progress")
    g.set_defaults(run=run_generate)

    r = actions.add_parser("register", parents=[conn], help="upload residual files; prints their ids")
    r.add_argument("files", nargs="+", metavar="FILE", help=".safetensors (or reference .pt, converted locally)")
    r.set_defaults(run=run_register)
    ls = actions.add_parser("list", parents=[conn], help="list registered residuals")
    ls.set_defaults(run=run_list)
    d = actions.add_parser("delete", parents=[conn], help="delete registered residuals by id")
    d.add_argument("ids", nargs="+", metavar="ID")
    d.set_defaults(run=run_delete)
    i = actions.add_parser("info", parents=[conn], help="show the server's model and limits")
    i.set_defaults(run=run_info)


def _client(args):
    from ..serve.auth import read_token_file
    from ..serve.client import Client

    token = read_token_file(args.token_file) if args.token_file else None
    return Client(args.target, token=token, tls=args.tls, tls_ca=args.tls_ca, timeout=args.timeout)


def _call(args, fn) -> int:
    """Run fn(client); an RPC error prints one line (exit 2 for INVALID_ARGUMENT, 1 otherwise)."""
    import grpc

    with _client(args) as client:
        try:
            return fn(client) or 0
        except grpc.RpcError as exc:
            print(f"cones2-engine client {args.action}: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return 2 if exc.code() == grpc.StatusCode.INVALID_ARGUMENT else 1


def run_generate(args) -> int:
    from ..serve.client import GenerateResult, build_request

    out = output_file(args.out, "out", (".png", ".safetensors"))   # checked before the server works
    output = {".png": "png", ".safetensors": "latents"}[out.suffix.lower()]
    seeds = choose_seeds(args.seed, args.num_images)               # generate's rule: default 0
    if args.resolution and (args.width or args.height):
        raise Cones2Error("give --resolution or --width/--height, not both", "--resolution")
    subjects = dict(key_value(s, "--subject") for s in args.subject)
    positions = {n: [int(v) for v in numbers(p, f"--position {n}")] for n, p in
                 (key_value(s, "--position") for s in args.position)}
    boxes = {n: numbers(v, f"--box {n}", 4) for n, v in (key_value(b, "--box") for b in args.box)}
    strengths = {n: numbers(v, f"--strength {n}", 1)[0] for n, v in (key_value(s, "--strength") for s in args.strength)}
    table = {}
    for item in args.color:
        color, spec = key_value(item, "--color")
        name, _, w = spec.partition(":")
        table[color] = (name, numbers(w, f"--color {color}", 1)[0] if w else 2.5)
    if args.color_map and not table:
        raise Cones2Error("--color-map needs at least one --color COLOR=NAME[:W]", "--color")
    request = build_request(
        args.prompt, subjects, boxes=boxes, strengths=strengths, subject_positions=positions,
        color_map=args.color_map, color_table=table, seed=seeds[0], steps=args.steps,
        guidance_steps=args.guidance_steps, guidance_weight=args.guidance_weight, cfg_scale=args.cfg,
        negative_weight=args.negative_weight, width=args.width or args.resolution,
        height=args.height or args.resolution, mode=args.mode, layout_resize=args.layout_resize, output=output,
        negative_prompt=args.negative_prompt)

    def one(client, seed: int) -> None:
        request.seed = seed
        if args.stream:
            result = None
            for event in client.stub.GenerateStream(request, **client._kw(None)):
                if event.HasField("progress"):
                    print(f"step {event.progress.step}/{event.progress.total_steps}", file=sys.stderr, flush=True)
                else:
                    result = GenerateResult.from_pb(event.result)
        else:
            result = client.generate_request(request)
        path = per_seed(out, seed, len(seeds) > 1)
        atomic_write(path, result.png if output == "png" else result.latents_safetensors)
        t = result.timings
        print(f"seed {result.seed}: wrote {path}  ({t.get('total', 0):.2f}s on the server, "
              f"queued {t.get('queue', 0):.2f}s, batch of {result.batch_size})", flush=True)

    def go(client) -> int:
        for seed in seeds:
            one(client, seed)
        return 0

    return _call(args, go)


def run_register(args) -> int:
    def go(client) -> int:
        for f in args.files:
            print(f"{client.register_residual(f)}  {f}")
        return 0

    return _call(args, go)


def run_list(args) -> int:
    def go(client) -> int:
        for r in client.list_residuals():
            print(f"{r.id}  word={r.word or '-'}  rows={r.rows}  D={r.dim}  {r.size_bytes} bytes")
        return 0

    return _call(args, go)


def run_delete(args) -> int:
    def go(client) -> int:
        for rid in args.ids:
            client.delete_residual(rid)
            print(f"deleted {rid}")
        return 0

    return _call(args, go)


def run_info(args) -> int:
    def go(client) -> int:
        print(client.info())
        return 0

    return _call(args, go)

