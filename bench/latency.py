#!/usr/bin/env python
"""Latency profile of cones2-engine on this device: stages, guided cross-attention on SD 2.1's
shapes, end-to-end generation per backend next to the reference-implementation style, as ratios
measured in one run. `python bench/latency.py --help`; same as `cones2-engine bench`.
The logic lives in the installed module `cones2.benchmark`."""
import sys

from cones2.benchmark import main

if __name__ == "__main__":
    sys.exit(main())
