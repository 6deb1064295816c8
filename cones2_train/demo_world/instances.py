"""Subject instances as `cones2-train` inputs: a folder of images plus world-specific caption templates.

    python -m cones2_train.demo_world.instances --instance twotone_triangle --out runs/twotone_triangle
    cones2-train --model runs/demo/model --images runs/twotone_triangle --word triangle \
        --templates runs/twotone_triangle/templates.txt --out triangle.safetensors ...

The shipped everyday-photo templates ("a photo of a {}") mean nothing to a model that only knows this
world, so the residual is averaged over captions of the world instead (SPEC 1.5 allows any fixed set).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from .world import BACKGROUNDS, COLOURS, INSTANCES, KINDS, compose_caption, instance_images


def templates_for(kind: str, count: int = 64, seed: int = 0) -> list[str]:
    """`count` distinct world captions with one `{}` for the subject (which never names its colour;
    the other objects are of other kinds and fully described)."""
    rng = np.random.default_rng([seed, KINDS.index(kind), 99])
    others = [k for k in KINDS if k != kind]
    out: list[str] = []
    for _ in range(100 * count):                      # far more tries than distinct captions needed
        if len(out) == count:
            break
        n_other = int(rng.integers(0, 3))
        phrases = [f"a {c} {k}" for k, c in zip(rng.choice(others, n_other, replace=False),
                                                 rng.choice(list(COLOURS), n_other, replace=False))]
        phrases.insert(int(rng.integers(0, n_other + 1)), "a {}")
        bg = str(rng.choice(list(BACKGROUNDS))) if rng.random() < 0.8 else None
        text = compose_caption(phrases, bg)
        if text not in out:
            out.append(text)
    return out


def write_instance_folder(instance: str, out: str | Path, count: int = 5, seed: int = 0) -> Path:
    """Write `count` PNGs of the instance and `templates.txt` (for --templates) into `out`."""
    inst = INSTANCES[instance]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(instance_images(inst, count, seed)):
        image.save(out / f"{instance}_{i}.png")
    (out / "templates.txt").write_text("\n".join(templates_for(inst.kind)) + "\n")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m cones2_train.demo_world.instances", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--instance", choices=sorted(INSTANCES), required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--count", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.count < 1:
        print("error: count: must be >= 1", file=sys.stderr)
        return 2
    folder = write_instance_folder(args.instance, args.out, args.count, args.seed)
    print(f"wrote {args.count} images and templates.txt to {folder} (word: {INSTANCES[args.instance].kind})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
