"""`bench/quality.py` with `fast` mode's work-reuse knobs (docs/speed.md): the same evaluation, the
same arguments, plus --gate-step and --cache-interval (SamplingConfig fields, fast mode only).

    python bench/fast_quality.py --model engine/cones2/data/demo_model --mode fast --steps 12 \\
        --guidance-steps 4 --gate-step 6 --cache-interval 2 --no-residuals --prompts 25 --json OUT
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import quality  # noqa: E402  (bench/quality.py, run as a script's module)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--gate-step", type=int, default=None)
    p.add_argument("--cache-interval", type=int, default=None)
    knobs, rest = p.parse_known_args(argv)
    extra = {k: v for k, v in vars(knobs).items() if v is not None}
    base = quality.ModelImages.__init__

    def with_knobs(self, *args, **kwargs):
        base(self, *args, **kwargs)
        self.settings.update(extra)

    quality.ModelImages.__init__ = with_knobs
    return quality.main(rest)


if __name__ == "__main__":
    sys.exit(main())
