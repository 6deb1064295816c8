"""The seams between the engine's public API and the service: a negative prompt over gRPC and HTTP/JSON,
the latents' metadata in JSON, and `cones2-engine client generate`'s seed rule (generate's: default 0,
lists, ranges, --num-images, every seed printed). Tiny model, in-process server on 127.0.0.1."""
from __future__ import annotations

import io
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

import cones2
from cones2.serve.client import Client, GenerateResult, HttpClient, build_request
from serve_support import make_residual, running_server

SIZE = 64
SETTINGS = dict(steps=2, guidance_steps=1, guidance_weight=0.3, cfg_scale=5.0, width=SIZE, height=SIZE)
BOXES = {"dog": (0.0, 0.0, 0.5, 1.0)}


@pytest.fixture(scope="module")
def server(tiny_engine, tmp_path_factory):
    with running_server(tiny_engine, tmp_path_factory.mktemp("store")) as s:
        yield s


def _metadata(safetensors_bytes: bytes, tmp_path) -> dict:
    path = tmp_path / "latents.safetensors"
    path.write_bytes(safetensors_bytes)
    with safe_open(str(path), "pt") as f:
        return f.metadata()


@pytest.mark.parametrize("transport", ["grpc", "http"])
def test_a_served_negative_prompt_equals_engine_generate(server, tiny_engine, transport, tmp_path):
    dog = make_residual(5)
    request = build_request("a dog and a mug", {"dog": dog}, boxes=BOXES, seed=9, output="latents",
                            negative_prompt="a blurry cat", **SETTINGS)
    if transport == "grpc":
        with Client(server.address, timeout=60) as c:
            got = c.generate_request(request)
    else:
        got = GenerateResult.from_pb(HttpClient(f"http://127.0.0.1:{server.http_port}").generate_request(request))

    layout = cones2.Layout.from_boxes(BOXES)
    want = tiny_engine.generate("a dog and a mug", {"dog": dog}, layout, negative_prompt="a blurry cat", seed=9,
                                progress=False, **SETTINGS)
    plain = tiny_engine.generate("a dog and a mug", {"dog": dog}, layout, seed=9, progress=False, **SETTINGS)
    assert torch.equal(got.latents, want.latents)                 # bit for bit, negative prompt included
    assert not torch.equal(want.latents, plain.latents)           # and the negative prompt changed the result

    # metadata: strings as they are, everything else JSON (nested layout/residual records stay readable)
    meta = _metadata(got.latents_safetensors, tmp_path)
    params = want.parameters()
    # the server hashes the bytes it was sent, which are the residual's canonical safetensors form
    assert json.loads(meta["residuals"])["dog"]["sha256"] == dog.sha256 == params["residuals"]["dog"]["sha256"]
    assert set(meta) == set(params)
    for key, value in params.items():
        got_value = meta[key] if isinstance(value, str) else json.loads(meta[key])
        assert got_value == (value if isinstance(value, str) else json.loads(json.dumps(value))), key
    assert any(not isinstance(v, str) for v in params.values())   # the JSON branch was exercised
    assert "a blurry cat" in json.dumps(params)                   # the negative prompt is recorded


def _pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


def _client(server, tmp_path, *flags) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-c", "import sys; from cones2.cli import main; sys.exit(main())", "client", "generate",
           "--target", server.address, "--timeout", "120", "--prompt", "a dog", "--steps", "1",
           "--resolution", str(SIZE), *flags]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)


def test_client_generate_follows_generates_seed_rule(server, tiny_engine, tmp_path):
    def want(seed):
        return np.asarray(tiny_engine.generate("a dog", seed=seed, steps=1, width=SIZE, height=SIZE,
                                               progress=False).image)

    one = _client(server, tmp_path, "--out", str(tmp_path / "one.png"))            # no --seed: seed 0
    assert one.returncode == 0, one.stderr
    assert one.stdout.startswith(f"seed 0: wrote {tmp_path / 'one.png'}")
    assert np.array_equal(_pixels((tmp_path / "one.png").read_bytes()), want(0))

    many = _client(server, tmp_path, "--seed", "7", "--num-images", "2", "--out", str(tmp_path / "m.png"),
                   "--negative-prompt", "")
    assert many.returncode == 0, many.stderr
    lines = many.stdout.splitlines()
    assert [line.split(":")[0] for line in lines] == ["seed 7", "seed 8"]
    for seed in (7, 8):
        path = tmp_path / f"m-{seed}.png"
        assert f"wrote {path}" in many.stdout
        assert np.array_equal(_pixels(path.read_bytes()), want(seed))
    assert not (tmp_path / "m.png").exists()

    bad = _client(server, tmp_path, "--seed", "3,3", "--out", str(tmp_path / "bad.png"))
    assert bad.returncode == 2 and "--seed" in bad.stderr and "repeats a seed" in bad.stderr


def test_a_served_request_locates_its_subjects_once(tiny_engine, tmp_path, monkeypatch):
    """Validation (`Engine.check`) tokenizes the prompt and locates the subjects; the worker encodes
    those token ids: the prompt is tokenized once, the negative prompt once, each subject word once."""
    import collections

    calls, lock = collections.Counter(), __import__("threading").Lock()
    tokenizer_type = type(tiny_engine.tokenizer)
    original = tokenizer_type.__call__

    def counting(self, text, *args, **kw):
        with lock:
            calls[text if isinstance(text, str) else repr(text)] += 1
        return original(self, text, *args, **kw)

    with running_server(tiny_engine, tmp_path / "store", warmup=False) as s, Client(s.address, timeout=60) as c:
        monkeypatch.setattr(tokenizer_type, "__call__", counting)
        got = c.generate("a dog and a mug", {"dog": make_residual(2)}, boxes={"mug": (0.5, 0.0, 1.0, 1.0)},
                         negative_prompt="rain", seed=4, output="latents", **SETTINGS)
        monkeypatch.setattr(tokenizer_type, "__call__", original)
    assert calls == {"a dog and a mug": 1, "dog": 1, "mug": 1, "rain": 1}, calls
    want = tiny_engine.generate("a dog and a mug", {"dog": make_residual(2)},
                                cones2.Layout.from_boxes({"mug": (0.5, 0.0, 1.0, 1.0)}), negative_prompt="rain",
                                seed=4, progress=False, **SETTINGS)
    assert torch.equal(got.latents, want.latents)               # the reused tokens place everything the same
