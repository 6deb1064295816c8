"""The gRPC service end to end on 127.0.0.1 (tiny model, CPU): round trip, stream, health, reflection,
validation (every bad input -> INVALID_ARGUMENT naming the field), residual RPCs across a restart,
metrics, auth, TLS and the `cones2-engine client` command."""
from __future__ import annotations

import io
import shutil
import subprocess
import threading
import urllib.request

import grpc
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load as st_load

import cones2
import spec_reference as ref
from cones2.serve.client import Client, build_request
from cones2.serve import cones2_pb2 as pb
from cones2.serve.server import SERVICE_NAME, ServeOptions, Server
from serve_support import make_residual, running_server

SIZE, STEPS = 64, 3


@pytest.fixture(scope="module")
def server(tiny_engine, tmp_path_factory):
    with running_server(tiny_engine, tmp_path_factory.mktemp("store"), metrics_port=0) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    with Client(server.address, timeout=60) as c:
        yield c


def _pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


# ---- round trip ---------------------------------------------------------------------------------
def test_generate_equals_engine_generate_and_the_spec_reference(client, tiny_engine):
    dog = make_residual(3)
    kw = dict(seed=11, steps=STEPS, guidance_steps=2, guidance_weight=0.3, cfg_scale=5.0, negative_weight=-1e4,
              width=SIZE, height=SIZE)
    boxes = {"dog": (0.0, 0.0, 0.5, 1.0)}
    png = client.generate("a dog and a mug", {"dog": dog}, boxes=boxes, strengths={"dog": 3.0}, **kw)
    lat = client.generate("a dog and a mug", {"dog": dog}, boxes=boxes, strengths={"dog": 3.0}, output="latents", **kw)

    want = tiny_engine.generate("a dog and a mug", {"dog": dog},
                                cones2.Layout.from_boxes(boxes, {"dog": 3.0}), progress=False, **kw)
    assert np.array_equal(_pixels(png.png), np.asarray(want.image))             # same image
    assert torch.equal(lat.latents, want.latents)                               # same latents, bit for bit
    assert torch.equal(st_load(lat.latents_safetensors)["cond_embeddings"], want.cond_embeddings)
    assert png.seed == 11 and png.batch_size == 1 and (png.width, png.height) == (SIZE, SIZE)
    t = png.timings
    assert 0 <= t["queue"] < 5 and t["prepare"] > 0 and t["sampling"] > 0 and t["decode"] > 0
    assert t["prepare"] + t["sampling"] + t["decode"] <= t["total"] < 60
    assert png.model_id == tiny_engine.components.model_id and png.engine_version == cones2.__version__
    assert png.png.startswith(b"\x89PNG") and lat.png == b"" and png.latents_safetensors == b""

    # and the independent SPEC implementation agrees (separate cond/uncond UNet calls: float rounding)
    c = tiny_engine.components
    mask = torch.zeros(SIZE, SIZE, dtype=torch.bool)
    mask[:, : SIZE // 2] = True
    s = c.scheduler_config
    r = ref.reference_generate(unet=c.unet, vae=c.vae, text_encoder=c.text_encoder, tokenizer=c.tokenizer,
                               prediction_type=tiny_engine.prediction_type, prompt="a dog and a mug",
                               residuals={"dog": dog.embedding}, positions=None, regions={"dog": (mask, 3.0)},
                               seed=11, steps=STEPS, guidance_steps=2, guidance_weight=0.3, cfg_scale=5.0,
                               negative_weight=-1e4, height=SIZE, width=SIZE, beta_start=s["beta_start"],
                               beta_end=s["beta_end"], beta_schedule=s["beta_schedule"],
                               num_train_timesteps=s["num_train_timesteps"])
    torch.testing.assert_close(lat.latents, r["latents"].float(), atol=1e-4, rtol=1e-4)


def test_unset_seed_is_chosen_and_reported(client, tiny_engine):
    out = client.generate("a mug", steps=2, width=SIZE, height=SIZE)
    want = tiny_engine.generate("a mug", seed=out.seed, steps=2, width=SIZE, height=SIZE, progress=False)
    assert np.array_equal(_pixels(out.png), np.asarray(want.image))


def test_stream_yields_ordered_progress_then_the_result(client):
    events = list(client.generate_stream("a dog and a mug", steps=4, width=SIZE, height=SIZE, seed=2,
                                         boxes={"mug": (0.5, 0.2, 1.0, 0.9)}, preview_every=2))
    progress, result = events[:-1], events[-1]
    assert [e.step for e in progress] == [1, 2, 3, 4] and {e.total_steps for e in progress} == {4}
    assert [bool(e.preview_png) for e in progress] == [False, True, False, True]
    assert Image.open(io.BytesIO(progress[1].preview_png)).size == (SIZE // 8, SIZE // 8)
    unary = client.generate("a dog and a mug", steps=4, width=SIZE, height=SIZE, seed=2,
                            boxes={"mug": (0.5, 0.2, 1.0, 0.9)})
    assert np.array_equal(_pixels(result.png), _pixels(unary.png))
    with pytest.raises(grpc.RpcError) as err:
        list(client.generate_stream("a dog", steps=0, width=SIZE, height=SIZE))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and err.value.details().startswith("steps:")


# ---- health and reflection ----------------------------------------------------------------------
def test_health_and_reflection(client, server):
    assert client.health() == "SERVING" and client.health(SERVICE_NAME) == "SERVING"
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

    db = ProtoReflectionDescriptorDatabase(client.channel)
    assert {SERVICE_NAME, "grpc.health.v1.Health"} <= set(db.get_services())
    from google.protobuf.descriptor_pool import DescriptorPool

    pool = DescriptorPool(db)
    assert [m.name for m in pool.FindServiceByName(SERVICE_NAME).methods][:2] == ["Generate", "GenerateStream"]


def test_not_serving_until_the_model_is_warm(tiny_engine, tmp_path):
    gate = threading.Event()

    def slow_engine():
        gate.wait(30)
        return tiny_engine

    server = Server(slow_engine, ServeOptions(port=0, residual_store=str(tmp_path))).start()
    try:
        with Client(server.address, timeout=10) as c:
            assert c.health() == "NOT_SERVING"
            with pytest.raises(grpc.RpcError) as err:
                c.generate("a dog", steps=1, width=SIZE, height=SIZE)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            gate.set()
            c.wait_until_serving(30)
            assert c.generate("a dog", steps=1, width=SIZE, height=SIZE).png
    finally:
        gate.set()
        server.stop(grace=0)


def test_model_load_failure_is_reported_and_health_stays_down(tmp_path):
    def broken():
        raise cones2.Cones2Error("no model here", "model")

    server = Server(broken, ServeOptions(port=0, residual_store=str(tmp_path))).start()
    try:
        with pytest.raises(cones2.Cones2Error, match="no model here"):
            server.wait_ready(30)
        with Client(server.address, timeout=10) as c:
            assert c.health() == "NOT_SERVING"
    finally:
        server.stop(grace=0)


# ---- validation ---------------------------------------------------------------------------------
def _png(colors: dict[tuple[int, int, int], tuple[slice, slice]], size: int = SIZE) -> bytes:
    arr = np.zeros((size, size, 3), np.uint8)
    for rgb, (rows, cols) in colors.items():
        arr[rows, cols] = rgb
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _req(prompt="a dog and a mug", **kw) -> pb.GenerateRequest:
    return build_request(prompt, steps=kw.pop("steps", 2), width=kw.pop("width", SIZE), height=kw.pop("height", SIZE),
                         **kw)


def _with(req: pb.GenerateRequest, fn) -> pb.GenerateRequest:
    fn(req)
    return req


NAN, INF = float("nan"), float("inf")
RED = _png({(255, 0, 0): (slice(0, 32), slice(0, 32))})
BAD_CASES = {
    "empty prompt": (lambda: _req(""), "prompt"),
    "blank prompt": (lambda: _req("   "), "prompt"),
    "prompt too long": (lambda: _req("dog " * 600), "prompt"),
    "unknown residual id": (lambda: _req(subjects={"dog": "a" * 64}), "subjects[0].residual_id"),
    "path as residual id": (lambda: _with(_req(), lambda r: r.subjects.add(name="dog", residual_id="../../etc/passwd")),
                            "subjects[0].residual_id"),
    "residual missing": (lambda: _with(_req(), lambda r: r.subjects.add(name="dog")), "subjects[0].residual"),
    "residual not safetensors": (lambda: _req(subjects={"dog": b"garbage"}), "subjects[0].residual_safetensors"),
    "residual wrong D": (lambda: _req(subjects={"dog": make_residual(dim=48)}), "subjects[0].residual_safetensors"),
    "residual too large": (lambda: _req(subjects={"dog": b"\0" * ((1 << 20) + 1)}), "subjects[0].residual_safetensors"),
    "subject not in prompt": (lambda: _req(subjects={"cat": make_residual()}), "subjects.cat"),
    "empty subject name": (lambda: _req(subjects={"": make_residual()}), "subjects[0].name"),
    "positions out of range": (lambda: _req(subjects={"dog": make_residual()}, subject_positions={"dog": [99]}),
                               "subject_positions.dog"),
    "too many subjects": (lambda: _req(" ".join(f"w{i}" for i in range(9)),
                                       subjects={f"w{i}": make_residual(i) for i in range(9)}), "subjects"),
    "too many boxes": (lambda: _req(" ".join(f"w{i}" for i in range(9)),
                                    boxes={f"w{i}": (0, 0, 1, 1) for i in range(9)}), "layout.boxes"),
    "box outside [0,1]": (lambda: _req(boxes={"dog": (0.0, 0.0, 1.5, 1.0)}), "layout.boxes.dog"),
    "box negative": (lambda: _req(boxes={"dog": (-0.1, 0.0, 0.5, 1.0)}), "layout.boxes.dog"),
    "box inverted": (lambda: _req(boxes={"dog": (0.6, 0.0, 0.4, 1.0)}), "layout.boxes.dog"),
    "box NaN": (lambda: _req(boxes={"dog": (0.0, NAN, 0.5, 1.0)}), "layout.boxes.dog"),
    "box strength inf": (lambda: _req(boxes={"dog": (0, 0, 0.5, 1)}, strengths={"dog": INF}), "layout.strengths.dog"),
    "box subject not in prompt": (lambda: _req(boxes={"cat": (0, 0, 0.5, 1)}), "layout.cat"),
    "box vanishes at this size": (lambda: _req(boxes={"dog": (0.5, 0.5, 0.505, 0.505)}), "layout.dog"),
    "width not a multiple of 64": (lambda: _req(width=100), "width"),
    "height over the limit": (lambda: _req(height=2048), "height"),
    "width zero": (lambda: _req(width=0), "width"),
    "steps zero": (lambda: _req(steps=0), "steps"),
    "steps over the limit": (lambda: _req(steps=151), "steps"),
    "guidance steps negative": (lambda: _req(guidance_steps=-1), "guidance_steps"),
    "cfg NaN": (lambda: _req(cfg_scale=NAN), "cfg_scale"),
    "guidance weight inf": (lambda: _req(guidance_weight=INF), "guidance_weight"),
    "negative weight NaN": (lambda: _req(negative_weight=NAN), "negative_weight"),
    "negative weight positive": (lambda: _req(negative_weight=1.0), "negative_weight"),
    "seed too large": (lambda: _req(seed=2**64 - 1), "seed"),
    "unknown output format": (lambda: _with(_req(), lambda r: setattr(r, "output_format", 9)), "output_format"),
    "unknown mode": (lambda: _with(_req(), lambda r: setattr(r, "mode", 7)), "mode"),
    "png does not decode": (lambda: _req(color_map=b"\x89PNG\r\n\x1a\nbroken", color_table={"255,0,0": ("dog", 2.5)}),
                            "layout.color_map.png"),
    "png truncated": (lambda: _req(color_map=RED[: len(RED) // 2], color_table={"255,0,0": ("dog", 2.5)}),
                      "layout.color_map.png"),
    "jpeg is not png": (lambda: _req(color_map=_jpeg(), color_table={"255,0,0": ("dog", 2.5)}), "layout.color_map.png"),
    "colour not in image": (lambda: _req(color_map=RED, color_table={"0,255,0": ("dog", 2.5)}), "layout.colors.0,255,0"),
    "colour malformed": (lambda: _req(color_map=RED, color_table={"red": ("dog", 2.5)}), "layout.colors"),
    "colour map without table": (lambda: _req(color_map=RED), "layout.color_map.entries"),
    "boxes and colour map": (lambda: _req(boxes={"dog": (0, 0, 1, 1)}, color_map=RED,
                                          color_table={"255,0,0": ("dog", 2.5)}), "layout"),
}


def _jpeg() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (SIZE, SIZE), (255, 0, 0)).save(buf, format="JPEG")
    return buf.getvalue()


@pytest.mark.parametrize("case", list(BAD_CASES))
def test_bad_input_is_invalid_argument_naming_the_field(client, case):
    make, field = BAD_CASES[case]
    with pytest.raises(grpc.RpcError) as err:
        client.generate_request(make())
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
    assert err.value.details().startswith(f"{field}:") or err.value.details().startswith(f"{field}."), \
        err.value.details()
    assert "Traceback" not in err.value.details()


def test_server_still_serves_after_bad_input(client, server):
    for make, _ in BAD_CASES.values():
        with pytest.raises(grpc.RpcError):
            client.generate_request(make())
    assert client.health() == "SERVING" and all(w.is_alive() for w in server.workers)
    assert client.generate("a dog", steps=1, width=SIZE, height=SIZE).png
    assert server.jobs.depth() == 0


def test_colour_map_layout_equals_the_same_boxes(client):
    png = _png({(255, 0, 0): (slice(0, SIZE), slice(0, SIZE // 2)), (0, 0, 255): (slice(8, 56), slice(32, 64))})
    a = client.generate("a dog and a mug", seed=4, steps=2, width=SIZE, height=SIZE, color_map=png,
                        color_table={"255,0,0": ("dog", 2.0), "#0000ff": ("mug", 3.0)}, output="latents")
    b = client.generate("a dog and a mug", seed=4, steps=2, width=SIZE, height=SIZE,
                        boxes={"dog": (0, 0, 0.5, 1), "mug": (0.5, 0.125, 1, 0.875)},
                        strengths={"dog": 2.0, "mug": 3.0}, output="latents")
    c = client.generate("a dog and a mug", seed=4, steps=2, width=SIZE, height=SIZE, output="latents")
    assert torch.equal(a.latents, b.latents) and not torch.equal(a.latents, c.latents)


def test_message_over_the_transport_limit_is_rejected_and_harmless(tiny_engine, tmp_path):
    with running_server(tiny_engine, tmp_path, max_message_bytes=64 << 10) as s, Client(s.address, timeout=30) as c:
        with pytest.raises(grpc.RpcError) as err:
            c.generate("a dog", {"dog": b"\0" * (100 << 10)}, steps=1, width=SIZE, height=SIZE)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert c.generate("a dog", steps=1, width=SIZE, height=SIZE).png


# ---- residual store over RPC --------------------------------------------------------------------
def test_residual_rpcs_survive_a_restart(tiny_engine, tmp_path):
    dog = make_residual(5)
    with running_server(tiny_engine, tmp_path) as s, Client(s.address, timeout=30) as c:
        rid = c.register_residual(dog)
        r = c.stub.RegisterResidual(pb.RegisterResidualRequest(safetensors=dog.to_safetensors_bytes()))
        assert r.residual.id == rid and not r.created
        assert [(i.id, i.word, i.rows, i.dim) for i in c.list_residuals()] == [(rid, "dog", 1, 32)]
        by_id = c.generate("a dog", {"dog": rid}, seed=1, steps=2, width=SIZE, height=SIZE)
        with pytest.raises(grpc.RpcError) as err:
            c.register_residual(make_residual(dim=48))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and err.value.details().startswith("safetensors:")
    with running_server(tiny_engine, tmp_path) as s, Client(s.address, timeout=30) as c:   # restarted
        assert [i.id for i in c.list_residuals()] == [rid]
        again = c.generate("a dog", {"dog": rid}, seed=1, steps=2, width=SIZE, height=SIZE)
        inline = c.generate("a dog", {"dog": dog}, seed=1, steps=2, width=SIZE, height=SIZE)
        assert np.array_equal(_pixels(again.png), _pixels(by_id.png))
        assert np.array_equal(_pixels(inline.png), _pixels(by_id.png))
        c.delete_residual(rid)
        assert c.list_residuals() == []
        with pytest.raises(grpc.RpcError) as err:
            c.delete_residual(rid)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        with pytest.raises(grpc.RpcError) as err:
            c.generate("a dog", {"dog": rid}, steps=1, width=SIZE, height=SIZE)
        assert err.value.details().startswith("subjects[0].residual_id: unknown residual id")


# ---- metrics, auth, TLS -------------------------------------------------------------------------
def test_metrics_endpoint(client, server):
    names = ['cones2_requests_total{code="INVALID_ARGUMENT",method="Generate"}',
             'cones2_requests_total{code="OK",method="Generate"}', "cones2_batch_size_count",
             "cones2_batch_size_sum", 'cones2_request_latency_seconds_count{method="Generate"}']
    before = {n: _metric(server, n) for n in names}
    with pytest.raises(grpc.RpcError):
        client.generate_request(_req(""))
    client.generate("a dog", steps=1, width=SIZE, height=SIZE)
    client.generate("a mug", steps=1, width=SIZE, height=SIZE)
    delta = {n: _metric(server, n) - before[n] for n in names}
    assert list(delta.values()) == [1, 2, 2, 2, 3]       # 2 batches of one request each; 3 latencies
    assert _metric(server, "cones2_queue_depth") == 0 and _metric(server, "cones2_ready") == 1
    assert _metric(server, "cones2_running_requests") == 0


def _metric(server, name: str) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10).read().decode()
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return 0.0


def test_bearer_token_auth(tiny_engine, tmp_path):
    with running_server(tiny_engine, tmp_path, auth_token="s3cret-token") as s:
        for token in (None, "wrong", "s3cret-tokenX"):
            with Client(s.address, token=token, timeout=30) as c:
                for call in (lambda: c.generate("a dog", steps=1, width=SIZE, height=SIZE),
                             lambda: list(c.generate_stream("a dog", steps=1, width=SIZE, height=SIZE)),
                             c.list_residuals, c.info):
                    with pytest.raises(grpc.RpcError) as err:
                        call()
                    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
                assert c.health() == "SERVING"            # probes stay open for load balancers
        with Client(s.address, token="s3cret-token", timeout=30) as c:
            assert c.generate("a dog", steps=1, width=SIZE, height=SIZE).png
            assert c.info().text_dim == 32
        assert s.metrics.requests.labels("Generate", "UNAUTHENTICATED")._value.get() == 3


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command to make a test certificate")
def test_tls(tiny_engine, tmp_path):
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    with running_server(tiny_engine, tmp_path / "store", tls_cert=cert.read_bytes(), tls_key=key.read_bytes()) as s:
        with Client(s.address, tls_ca=cert, timeout=30) as c:
            assert c.generate("a dog", steps=1, width=SIZE, height=SIZE).png
        with Client(s.address, timeout=5) as plain:
            with pytest.raises(grpc.RpcError) as err:
                plain.generate("a dog", steps=1, width=SIZE, height=SIZE)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE


# ---- the client command -------------------------------------------------------------------------
def test_client_command(server, client, tmp_path, capsys):
    from cones2.cli import main

    dog = make_residual(8)
    dog.save(tmp_path / "dog.safetensors")
    out = tmp_path / "x.png"
    common = ["--prompt", "a dog and a mug", "--box", "dog=0,0,0.5,1", "--strength", "dog=2", "--seed", "3",
              "--steps", "2", "--resolution", str(SIZE)]
    assert main(["client", "generate", "--target", server.address, "--subject", f"dog={tmp_path / 'dog.safetensors'}",
                 *common, "--out", str(out)]) == 0
    want = client.generate("a dog and a mug", {"dog": dog}, boxes={"dog": (0, 0, 0.5, 1)}, strengths={"dog": 2},
                           seed=3, steps=2, width=SIZE, height=SIZE)
    assert np.array_equal(_pixels(out.read_bytes()), _pixels(want.png))

    assert main(["client", "register", "--target", server.address, str(tmp_path / "dog.safetensors")]) == 0
    rid = capsys.readouterr().out.split()[-2]
    assert main(["client", "generate", "--target", server.address, "--subject", f"dog={rid}", *common,
                 "--out", str(tmp_path / "y.png"), "--stream"]) == 0
    assert np.array_equal(_pixels((tmp_path / "y.png").read_bytes()), _pixels(want.png))
    assert "step 2/2" in capsys.readouterr().err
    assert main(["client", "list", "--target", server.address]) == 0
    assert rid in capsys.readouterr().out
    assert main(["client", "delete", "--target", server.address, rid]) == 0
    assert main(["client", "generate", "--target", server.address, "--prompt", "", "--out", str(out)]) == 2
    assert "INVALID_ARGUMENT: prompt:" in capsys.readouterr().err


def test_validation_and_the_worker_share_the_engine_tokenizer_safely(tiny_engine, tmp_path):
    """Validation (RPC threads, `Engine.check`) and sampling (the worker) tokenize at once through
    the engine's one lock: every validation sees the same subject positions as a lone check."""
    from cones2.serve.residual_store import ResidualStore
    from cones2.serve.validation import Limits, validate

    store = ResidualStore(tmp_path, text_dim=32)
    msg = _req("a photo of a dog and a mug", subjects={"dog": make_residual()}, boxes={"mug": (0.5, 0, 1, 1)})
    want = [(t.name, t.word_positions) for t in tiny_engine.check(validate(msg, tiny_engine, store, Limits()).request)]
    assert want == [("dog", (5,)), ("mug", (8,))]
    seen, stop = [], threading.Event()

    def check():
        while not stop.is_set():
            v = validate(msg, tiny_engine, store, Limits())
            seen.append([(t.name, t.word_positions) for t in tiny_engine.check(v.request)])

    threads = [threading.Thread(target=check) for _ in range(2)]
    for t in threads:
        t.start()
    try:
        for seed in range(3):      # the worker's side: prompts of other lengths, encoded meanwhile
            tiny_engine.generate("a dog on a long sandy beach under a wide blue sky", seed=seed, steps=1,
                                 width=SIZE, height=SIZE, progress=False)
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert len(seen) > 10 and all(s == want for s in seen)


def test_port_in_use_is_a_clear_error(server, tiny_engine, tmp_path):
    with pytest.raises(cones2.Cones2Error, match="cannot listen") as err:
        Server(lambda: tiny_engine, ServeOptions(port=server.port, residual_store=str(tmp_path))).start()
    assert err.value.field == "port"
    with pytest.raises(cones2.Cones2Error, match="cannot serve metrics") as err:
        Server(lambda: tiny_engine, ServeOptions(port=0, metrics_port=server.metrics_port,
                                                 residual_store=str(tmp_path))).start()
    assert err.value.field == "metrics_port"


def test_client_command_checks_its_output_before_calling_the_server(tmp_path, capsys):
    from cones2.cli import main

    a_file = tmp_path / "file"
    a_file.write_text("x")
    nowhere = ["client", "generate", "--target", "127.0.0.1:1", "--timeout", "2", "--prompt", "a dog"]  # no server
    assert main([*nowhere, "--out", str(a_file / "x.png")]) == 2
    assert "error: out: cannot write under" in capsys.readouterr().err
    assert main([*nowhere, "--out", str(tmp_path / "x.jpg")]) == 2
    assert "error: out: must end in .png or .safetensors" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_layout_resize_travels_from_the_client_to_the_sampling_config(tiny_engine, tmp_path):
    """The wire enum maps to SamplingConfig.layout_resize; unset is SPEC 3's aligned-corners."""
    from cones2.serve.client import build_request
    from cones2.serve.residual_store import ResidualStore
    from cones2.serve.validation import Limits, validate

    store = ResidualStore(tmp_path, text_dim=32)
    boxes = {"dog": (0.1, 0.1, 0.6, 0.6)}
    got = {rule: validate(build_request("a dog", boxes=boxes, layout_resize=rule), tiny_engine, store,
                          Limits()).request.config.layout_resize for rule in (None, "aligned-corners", "cell-centres")}
    assert got == {None: "aligned-corners", "aligned-corners": "aligned-corners", "cell-centres": "cell-centres"}
    with pytest.raises(cones2.Cones2Error, match="layout_resize"):
        build_request("a dog", boxes=boxes, layout_resize="area")
    msg = build_request("a dog", boxes=boxes)
    msg.layout_resize = 7                                    # an enum value this server does not know
    with pytest.raises(cones2.Cones2Error, match="layout_resize: unknown layout resize rule 7"):
        validate(msg, tiny_engine, store, Limits())
