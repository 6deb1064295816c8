"""A bounded, seeded gRPC fuzz run (cones2.serve.fuzz) against a real server on 127.0.0.1 with the tiny
model: a few hundred hostile requests of every kind (non-finite and huge floats in every float field,
wire-type-extreme ints, oversized names/prompts/positions, bad colour maps including 4096x4096 and
text bombs, bad residual bytes, unknown enums, random and undecodable bytes, missing tokens, a message
over the transport limit) with valid ones mixed in, from 8 client threads at once.

Asserted: every answer is the documented code for its case (exactly the counts the same seeded cases
predict, computed here without the server), no INTERNAL, every valid request OK with a correct image,
the server still SERVING with its worker alive, and resident memory bounded."""
from __future__ import annotations

import random
from collections import Counter

import pytest
import torch

from cones2.serve import cones2_pb2 as pb
from cones2.serve.client import Client
from cones2.serve.fuzz import CaseMaker, run_fuzz
from cones2.serve.validation import Limits
from cones2.threads import configure_threads
from serve_support import PeakRSS, running_server

N, SEED, CLIENTS = 400, 13, 8
TOKEN = "fuzz-token"
# Small transport and field limits, so the cases just over them are cheap to send.
MESSAGE_BYTES = 1 << 20
LIMITS = Limits(max_residual_bytes=64 << 10, max_layout_png_bytes=256 << 10)
MiB = 1 << 20
# One 4096x4096 colour map decoded costs at least 64 MiB (PIL's 4 bytes per pixel) and more for its RGB
# copies; one text bomb inflates 60 MiB. The run sends dozens of each and 8 at a time, so a bound of
# two of them shows none was (with the text chunks passed to PIL, this run grew 272 MiB).
RSS_BOUND = 120 * MiB


@pytest.fixture
def one_thread():
    """As `cones2-engine serve --threads 1`: on a small machine shared with other jobs, torch's default
    threads make each step of the tiny model tens of times slower (docs/serve.md)."""
    before = torch.get_num_threads()
    configure_threads(1)
    yield
    torch.set_num_threads(before)


def test_seeded_fuzz_run_gets_only_documented_answers(tiny_engine, tmp_path, one_thread):
    with running_server(tiny_engine, tmp_path, auth_token=TOKEN, max_queue=2 * CLIENTS, max_batch=4,
                        max_message_bytes=MESSAGE_BYTES, limits=LIMITS) as server, Client(server.address, token=TOKEN, timeout=60) as c:
        assert c.generate("a dog and a mug", steps=2, width=64, height=64).png      # warm, before measuring
        info = c.info()
        # the same seeded cases, drawn here without the server: what each one must get
        cases = [_case(info, i) for i in range(N)]
        with PeakRSS() as mem:
            report = run_fuzz(server.address, N, seed=SEED, clients=CLIENTS, token=TOKEN, **_limits())
        assert c.health() == "SERVING" and all(w.is_alive() for w in server.workers)
        assert server.jobs.depth() == 0 and server.jobs.stats.running == 0
        assert c.generate("a dog", steps=1, width=64, height=64).width == 64

    assert report.failures == [], report.failures[:10]
    assert report.codes.get("INTERNAL", 0) == 0 and report.sent == N
    assert report.longest_details <= 300

    valid = [k for k in cases if k.valid]
    assert report.valid == len(valid) and report.valid_ok == len(valid)
    fixed = Counter(next(iter(k.expected)) for k in cases if len(k.expected) == 1)
    loose = [k for k in cases if len(k.expected) > 1]         # random bytes that happen to parse
    for code, count in fixed.items():
        assert count <= report.codes[code] <= count + len(loose), (code, count, report.codes)
    assert sum(report.codes.values()) == N
    kinds = Counter(k.kind.split(":")[0] for k in cases)
    assert set(kinds) >= {"float", "int", "enum", "size", "colour map", "residual", "words", "bytes", "rpc", "auth",
                          "valid"}, kinds
    assert fixed["UNAUTHENTICATED"] > 0 and fixed["RESOURCE_EXHAUSTED"] > 0 and fixed["INVALID_ARGUMENT"] > N // 2

    growth = mem.peak - mem.start
    print(f"fuzz: {report.summary()}, resident memory +{growth / MiB:.1f} MiB")
    assert growth < RSS_BOUND, f"resident memory grew {growth / MiB:.0f} MiB during the run"


def _limits() -> dict:
    return {"max_message_bytes": MESSAGE_BYTES, "max_layout_png_bytes": LIMITS.max_layout_png_bytes,
            "max_layout_pixels": LIMITS.max_layout_pixels}


def _case(info: pb.ServerInfo, i: int):
    maker = CaseMaker(random.Random(i), info, token=True, **_limits())
    maker.rng = random.Random(SEED * 1_000_003 + i)
    return maker()
