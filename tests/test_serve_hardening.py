"""Hostile input over gRPC (issue 13): values beyond float32, oversized names, positions and colour
maps, undecodable bytes; every one gets a short INVALID_ARGUMENT naming the field, in well under a
second, without decoding what it need not decode. Also: values at their documented bounds run in a
batch without hurting its other members, and health says NOT_SERVING while the server drains."""
from __future__ import annotations

import io
import logging
import threading

import grpc
import numpy as np
import pytest
from PIL import Image

from cones2.serve import cones2_pb2 as pb
from cones2.serve.client import Client, build_request
from cones2.serve.server import SERVICE_NAME, ServeOptions, Server
from cones2.serve.validation import Limits, pixel_chunks
from serve_support import PeakRSS, SteppedEngine, huge_png, make_residual, png_bytes, running_server, wait_for

SIZE = 64
MiB = 1 << 20
RED = png_bytes({(255, 0, 0): (slice(0, 32), slice(0, 32))})


@pytest.fixture(scope="module")
def server(tiny_engine, tmp_path_factory):
    with running_server(tiny_engine, tmp_path_factory.mktemp("store")) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    with Client(server.address, timeout=60) as c:
        yield c


def _req(prompt="a dog and a mug", **kw) -> pb.GenerateRequest:
    return build_request(prompt, steps=kw.pop("steps", 1), width=kw.pop("width", SIZE), height=kw.pop("height", SIZE),
                         **kw)


def _with(req: pb.GenerateRequest, fn) -> pb.GenerateRequest:
    fn(req)
    return req


def _box(**fields):
    return lambda r: r.layout.boxes.add(subject="dog", x0=0, y0=0, x1=0.5, y1=1, **fields)


LONG = "d" * 10_000
HOSTILE = {
    # floats: non-finite and beyond float32 in every float field
    "box strength 1e308": (lambda: _with(_req(), _box(strength=1e308)), "layout.strengths.dog"),
    "box strength -1e308": (lambda: _with(_req(), _box(strength=-1e308)), "layout.strengths.dog"),
    "box strength nan": (lambda: _with(_req(), _box(strength=float("nan"))), "layout.strengths.dog"),
    "box x1 1e308": (lambda: _with(_req(), lambda r: r.layout.boxes.add(subject="dog", x1=1e308, y1=1)),
                     "layout.boxes.dog"),
    "box y0 -inf": (lambda: _with(_req(), lambda r: r.layout.boxes.add(subject="dog", y0=float("-inf"), x1=1, y1=1)),
                    "layout.boxes.dog"),
    "negative weight -1e308": (lambda: _req(negative_weight=-1e308), "negative_weight"),
    "negative weight -inf": (lambda: _req(negative_weight=float("-inf")), "negative_weight"),
    "cfg 1e308": (lambda: _req(cfg_scale=1e308), "cfg_scale"),
    "cfg -1e39": (lambda: _req(cfg_scale=-1e39), "cfg_scale"),
    "guidance weight 1e39": (lambda: _req(guidance_weight=1e39), "guidance_weight"),
    "colour strength 1e308": (lambda: _req(color_map=RED, color_table={"255,0,0": ("dog", 1e308)}),
                              "layout.colors.255,0,0"),
    # integers at the ends of their wire types
    "steps 2**31-1": (lambda: _req(steps=2**31 - 1), "steps"),
    "steps -2**31": (lambda: _req(steps=-2**31), "steps"),
    "width -64": (lambda: _req(width=-64), "width"),
    "height 2**31-1": (lambda: _req(height=2**31 - 1), "height"),
    "guidance steps 2**31-1": (lambda: _req(guidance_steps=2**31 - 1), "guidance_steps"),
    "guidance steps -2**31": (lambda: _req(guidance_steps=-2**31), "guidance_steps"),
    "seed 2**63": (lambda: _req(seed=2**63), "seed"),
    "preview every -1": (lambda: _with(_req(), lambda r: setattr(r, "preview_every", -1)), "preview_every"),
    "output format -1": (lambda: _with(_req(), lambda r: setattr(r, "output_format", -1)), "output_format"),
    "mode 2**31-1": (lambda: _with(_req(), lambda r: setattr(r, "mode", 2**31 - 1)), "mode"),
    # sizes
    "prompt of 100,000 characters": (lambda: _req("a dog " * 16_667), "prompt"),
    "100,000 positions": (lambda: _req(subjects={"dog": make_residual()}, subject_positions={"dog": range(100_000)}),
                          "subjects[0].positions"),
    "position 2**31-1": (lambda: _req(subjects={"dog": make_residual()}, subject_positions={"dog": [2**31 - 1]}),
                         "subject_positions.dog"),
    "10,000-character subject": (lambda: _req("a dog", subjects={LONG: make_residual()}), "subjects"),
    "10,000-character box subject": (lambda: _req("a dog", boxes={LONG: (0, 0, 1, 1)}), "layout.boxes"),
    "10,000-character colour subject": (lambda: _req(color_map=RED, color_table={"255,0,0": (LONG, 2.5)}),
                                        "layout.colors.255,0,0"),
    "10,000-character colour": (lambda: _req(color_map=RED, color_table={"1" * 10_000: ("dog", 2.5)}),
                                "layout.color_map.entries[0].color"),
    "10,000-character residual id": (lambda: _with(_req(), lambda r: r.subjects.add(name="dog", residual_id=LONG)),
                                     "subjects[0].residual_id"),
    "65 colour entries": (lambda: _req(color_map=RED, color_table={f"{i},0,0": ("dog", 2.5) for i in range(65)}),
                          "layout.color_map.entries"),
    "subject past the 77-token limit": (lambda: _req("a " * 80 + "dog", subjects={"dog": make_residual()}),
                                        "subjects.dog"),
    # colour maps
    "4096x4096 colour map": (lambda: _req(color_map=huge_png(), color_table={"255,0,0": ("dog", 2.5)}),
                             "layout.color_map.png"),
    "colour map over 4 MiB": (lambda: _req(color_map=RED + b"\0" * (4 * MiB), color_table={"255,0,0": ("dog", 2.5)}),
                              "layout.color_map.png"),
    "PNG of 0x0 pixels": (lambda: _req(color_map=RED[:16] + b"\0" * 8 + RED[24:], color_table={"255,0,0": ("dog", 2)}),
                          "layout.color_map.png"),
    "PNG cut inside its pixels": (lambda: _req(color_map=RED[:60], color_table={"255,0,0": ("dog", 2.5)}),
                                  "layout.color_map.png"),
    # residual bytes
    "residual of 3 rows for a 1-token word": (lambda: _req(subjects={"dog": make_residual(rows=3)}), "subjects.dog"),
    "residual with a huge header length": (lambda: _req(subjects={"dog": b"\xff" * 8 + b"{}"}),
                                           "subjects[0].residual_safetensors"),
    "residual header echoing 5,000 characters": (lambda: _req(subjects={"dog": _echoing_safetensors()}),
                                                 "subjects[0].residual_safetensors"),
}


def _echoing_safetensors() -> bytes:
    """A safetensors header whose JSON error message would quote a 5,000-character string."""
    import struct

    header = b'{"residual": "' + b"A" * 5000 + b'"}'
    header += b" " * (-len(header) % 8)
    return struct.pack("<Q", len(header)) + header


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_values_get_a_short_invalid_argument_at_once(server, client, case):
    make, field = HOSTILE[case]
    request = make()
    batches = server.jobs.stats.batches
    with pytest.raises(grpc.RpcError) as err:
        client.generate_request(request)
    details = err.value.details()
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, details
    assert details.startswith(f"{field}:"), details
    assert len(details) <= 200 and "\n" not in details and "Traceback" not in details, details
    assert server.jobs.stats.batches == batches and server.jobs.depth() == 0, "refused before it was queued"


def test_undecodable_bytes_get_invalid_argument_and_one_warning_line(server, caplog):
    garbage = b"\x00\x01\x02 not a protobuf message \xff"
    calls = [(f"/{SERVICE_NAME}/{m}", f"cones2.v1.{t}", False) for m, t in [
        ("Generate", "GenerateRequest"), ("RegisterResidual", "RegisterResidualRequest"),
        ("ListResiduals", "ListResidualsRequest"), ("DeleteResidual", "DeleteResidualRequest"),
        ("GetServerInfo", "GetServerInfoRequest")]]
    calls += [(f"/{SERVICE_NAME}/GenerateStream", "cones2.v1.GenerateRequest", True),
              ("/grpc.health.v1.Health/Check", "grpc.health.v1.HealthCheckRequest", False)]
    caplog.set_level(logging.INFO)
    with grpc.insecure_channel(server.address) as channel:
        for path, type_name, streaming in calls:
            call = channel.unary_stream(path) if streaming else channel.unary_unary(path)   # bytes in, bytes out
            with pytest.raises(grpc.RpcError) as err:
                result = call(garbage, timeout=10)
                if streaming:
                    list(result)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (path, err.value.details())
            assert err.value.details() == f"request: not a valid {type_name} message"
    records = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert [r.levelname for r in records] == ["WARNING"] * len(calls)
    assert all(r.exc_info is None and "undecodable" in r.getMessage() for r in records)
    with Client(server.address, timeout=30) as c:
        assert c.health() == "SERVING" and c.generate("a dog", steps=1, width=SIZE, height=SIZE).width == SIZE


def test_undecodable_requests_are_counted_in_metrics(tiny_engine, tmp_path):
    with running_server(tiny_engine, tmp_path) as s, grpc.insecure_channel(s.address) as channel:
        for _ in range(3):
            with pytest.raises(grpc.RpcError):
                channel.unary_unary(f"/{SERVICE_NAME}/Generate")(b"\x07", timeout=10)
        assert s.metrics.requests.labels("Generate", "INVALID_ARGUMENT")._value.get() == 3


# ---- colour maps --------------------------------------------------------------------------------
def test_colour_map_pixels_are_bounded_from_the_header(tiny_engine, tmp_path):
    def flat(w: int, h: int) -> bytes:
        buf = io.BytesIO()
        Image.new("RGB", (w, h), (255, 0, 0)).save(buf, format="PNG")
        return buf.getvalue()

    with running_server(tiny_engine, tmp_path, limits=Limits(max_layout_pixels=64 * 64)) as s, \
            Client(s.address, timeout=30) as c:
        table = {"255,0,0": ("dog", 2.5)}
        assert c.generate("a dog", color_map=flat(64, 64), color_table=table, steps=1, width=SIZE, height=SIZE).png
        with pytest.raises(grpc.RpcError) as err:
            c.generate("a dog", color_map=flat(65, 64), color_table=table, steps=1, width=SIZE, height=SIZE)
        assert err.value.details() == "layout.color_map.png: 65x64 is over this server's limit of 4096 pixels"


def test_sixteen_huge_colour_maps_at_once_are_refused_without_decoding(client):
    table = {"255,0,0": ("dog", 2.5)}
    small = _req("a mug", color_map=RED, color_table=table)            # refused after decoding 64x64 pixels
    huge = _req(color_map=huge_png(), color_table=table)
    with PeakRSS() as baseline:                                         # the same traffic, nothing to decode
        errors = [f.exception() for f in [client.stub.Generate.future(small, timeout=60) for _ in range(16)]]
    assert [e.code() for e in errors] == [grpc.StatusCode.INVALID_ARGUMENT] * 16
    with PeakRSS() as mem:
        errors = [f.exception() for f in [client.stub.Generate.future(huge, timeout=60) for _ in range(16)]]
    assert [e.code() for e in errors] == [grpc.StatusCode.INVALID_ARGUMENT] * 16
    assert {e.details() for e in errors} == {
        "layout.color_map.png: 4096x4096 is over this server's limit of 4194304 pixels"}
    # decoding one of them would take 64 MiB (PIL's 4 bytes per pixel); sixteen, 1 GiB
    growth, base = mem.peak - mem.start, baseline.peak - baseline.start
    assert growth < base + 32 * MiB, f"resident memory grew {growth / MiB:.0f} MiB (baseline {base / MiB:.0f} MiB)"


def test_text_chunks_are_never_inflated(client):
    """A 66 KB colour map carrying 60 MiB of compressed text: accepted (its pixels are fine), and its
    text never reaches the decoder, so four at once cost no memory to speak of."""
    bomb = png_bytes({(255, 0, 0): (slice(0, 32), slice(0, 32))}, text_chunks=60)
    assert len(bomb) < 100_000
    stripped, width, height = pixel_chunks(bomb, "png")
    assert (width, height) == (SIZE, SIZE) and len(stripped) < 1000
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(stripped))), np.asarray(Image.open(io.BytesIO(bomb))))
    plain = client.generate("a dog", color_map=RED, color_table={"255,0,0": ("dog", 2.5)}, seed=3, steps=1,
                            width=SIZE, height=SIZE)
    def four(png):
        futures = [client.stub.Generate.future(_req("a dog", color_map=png, color_table={"255,0,0": ("dog", 2.5)},
                                                    seed=3), timeout=60) for _ in range(4)]
        return [f.result().image for f in futures]

    with PeakRSS() as baseline:                         # the same four generations with the plain map
        four(RED)
    with PeakRSS() as mem:
        images = four(bomb)
    growth, base = mem.peak - mem.start, baseline.peak - baseline.start
    # inflating one bomb would take 60 MiB
    assert growth < base + 32 * MiB, f"resident memory grew {growth / MiB:.0f} MiB (baseline {base / MiB:.0f} MiB)"
    for png in images:     # same layout as the plain PNG (batched: float rounding, at most one level)
        diff = np.abs(np.asarray(Image.open(io.BytesIO(png)), int) - np.asarray(plain.image, int))
        assert diff.max() <= 1


@pytest.mark.parametrize("data, message", [
    (b"GIF89a" + b"\0" * 40, "is not a PNG image"),
    (b"\x89PNG\r\n\x1a\n" + b"\0" * 4 + b"IDAT" + b"\0" * 30, "is a PNG without its IHDR header"),
])
def test_pixel_chunks_refuses_what_is_not_a_png(data, message):
    from cones2 import Cones2Error

    with pytest.raises(Cones2Error, match=message) as err:
        pixel_chunks(data, "layout.color_map.png")
    assert err.value.field == "layout.color_map.png"


# ---- bounds that pass must run, in a batch, without hurting the batch --------------------------
def test_values_at_their_bounds_run_batched_with_an_ordinary_request(tiny_engine, tmp_path):
    extreme = dict(prompt="a dog and a mug", seed=1, steps=3, guidance_weight=10.0, cfg_scale=100.0,
                   negative_weight=-1e9, boxes={"dog": (0, 0, 0.5, 1)}, strengths={"dog": 1e4})
    ordinary = dict(prompt="a dog", seed=2, steps=3)
    engine = SteppedEngine(tiny_engine)
    with running_server(engine, tmp_path, max_batch=4) as s, Client(s.address) as c:
        blocker = c.stub.Generate.future(_req(steps=4, width=128, height=128))
        wait_for(lambda: s.jobs.stats.running == 1, 60)
        futures = [c.stub.Generate.future(_req(**spec), timeout=60) for spec in (extreme, ordinary)]
        wait_for(lambda: s.jobs.depth() == 2, 60)
        engine.run_freely()                   # the blocker was held: both queued ones form one batch
        results = [f.result() for f in futures]
        assert blocker.result().image
    assert [r.batch_size for r in results] == [2, 2]
    want = tiny_engine.generate("a dog", seed=2, steps=3, width=SIZE, height=SIZE, progress=False)
    diff = np.abs(np.asarray(Image.open(io.BytesIO(results[1].image)), int) - np.asarray(want.image, int))
    assert diff.max() <= 1


# ---- draining -----------------------------------------------------------------------------------
def test_health_is_not_serving_while_draining_and_in_flight_work_finishes(tiny_engine, tmp_path):
    engine = SteppedEngine(tiny_engine)
    server = Server(lambda: engine, ServeOptions(port=0, residual_store=str(tmp_path), grace_seconds=120,
                                                 warmup=False)).start()
    stopper = threading.Thread(target=server.stop)
    try:
        assert server.wait_ready(60)
        with Client(server.address, timeout=60) as c:
            in_flight = c.stub.Generate.future(_req("a dog", steps=20, seed=4), timeout=120)   # held by the test
            wait_for(lambda: server.jobs.stats.running == 1, 60)
            stopper.start()
            wait_for(lambda: c.health() != "SERVING", 60)
            assert c.health() == "NOT_SERVING" and c.health(SERVICE_NAME) == "NOT_SERVING"   # the port is open
            with pytest.raises(grpc.RpcError) as err:
                c.generate("a dog", steps=1, width=SIZE, height=SIZE)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "shutting down" in err.value.details()
            assert not in_flight.done()
            engine.run_freely()
            out = in_flight.result()
            stopper.join(30)
            assert not stopper.is_alive()
            with pytest.raises(grpc.RpcError) as err:                     # now the port is closed
                c.health(timeout=2)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        want = tiny_engine.generate("a dog", seed=4, steps=20, width=SIZE, height=SIZE, progress=False)
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(out.image))), np.asarray(want.image))
    finally:
        server.stop(grace=0)
