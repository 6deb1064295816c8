"""ONNX export of the embedded model with the layout as dynamic inputs, checked against the
independent SPEC reference (tests/spec_reference.py) in ONNX Runtime on the CPU; the
`onnxruntime` engine backend and the CLI against the torch `sdpa` backend.

One export per session (tests/export_support.py, through `cones2-engine export onnx`).
"""

import json
import os
import sys

import numpy as np
import pytest
import torch
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import spec_reference as ref  # noqa: E402
from ci_support import import_or_skip  # noqa: E402
from export_support import exported_onnx_dir  # noqa: E402

import cones2  # noqa: E402
from cones2.errors import Cones2Error  # noqa: E402

onnx = import_or_skip("onnx", "ONNX export needs the [export] extra")
ort = import_or_skip("onnxruntime", "ONNX export needs the [export] extra")

PROMPT = "a dog and a mug on the beach"
UNET_ATOL = 1e-4        # ORT vs the SPEC reference on the UNet output (seen: ~2e-6)
LATENT_ATOL = 1e-4      # onnxruntime vs sdpa engine, final latents after sampling (seen: ~1e-5)


@pytest.fixture(scope="module")
def onnx_dir(tmp_path_factory):
    return exported_onnx_dir(tmp_path_factory)


@pytest.fixture(scope="module")
def engine():
    """The embedded default model (what the export came from), torch sdpa backend."""
    return cones2.Engine.from_pretrained(None, backend="sdpa")


def _session(onnx_dir, name):
    return ort.InferenceSession(str(onnx_dir / f"{name}.onnx"), providers=["CPUExecutionProvider"])


def _boxes(height, width, shift=0.0):
    """Masks for dog and mug at the output size (normalised boxes, like Layout.from_boxes)."""
    def box(x0, y0, x1, y1):
        m = torch.zeros(height, width, dtype=torch.bool)
        m[round(y0 * height):round(y1 * height), round(x0 * width):round(x1 * width)] = True
        return m
    return {"dog": (box(0.05 + shift, 0.35, 0.5 + shift, 0.95), 2.5), "mug": (box(0.55 - shift, 0.45, 0.95 - shift, 0.95), 2.5)}


def _unet_case(engine, images, height, width, seed, shift=0.0):
    """A sampler-shaped UNet batch: rows [cond_1..cond_R, uncond_1..uncond_R]; cond rows guided
    (coef > 0) with per-image layouts; uncond rows get coef 0 but non-zero maps (must be ignored)."""
    g = torch.Generator().manual_seed(seed)
    B = 2 * images
    levels = ref.level_sizes_for(engine.unet, height, width)
    maps = [ref.weight_maps(engine.tokenizer, PROMPT, _boxes(height, width, shift + 0.1 * i), -1e8, height, width, levels)
            for i in range(images)]
    rows = maps + maps
    inputs = {
        "sample": torch.randn(B, 4, height // 8, width // 8, generator=g),
        "timestep": torch.tensor([900.0, 400.0, 900.0, 400.0][:B] if images == 2 else [700.0] * B),
        "encoder_hidden_states": torch.randn(B, 77, 32, generator=g),
        "coef": torch.tensor([0.4, 0.2][:images] + [0.0] * images),
    }
    for level, (h, w) in enumerate(levels):
        inputs[f"weight_{level}"] = torch.stack([rows[b][(h, w)] for b in range(B)])
    return inputs, [{h * w: W for (h, w), W in m.items()} for m in rows]


@torch.no_grad()
def _spec_unet(engine, inputs, maps_by_n):
    """The SPEC reference: one row at a time, ReferenceAttnProcessor, rectified only when coef > 0."""
    unet = engine.unet
    state = {"weights_by_n": None, "coef": 0.0}
    saved = unet.attn_processors
    unet.set_attn_processor(ref.ReferenceAttnProcessor(state))
    try:
        out = []
        for b in range(inputs["sample"].shape[0]):
            c = float(inputs["coef"][b])
            state["weights_by_n"], state["coef"] = (maps_by_n[b] if c > 0 else None), c
            out.append(unet(inputs["sample"][b:b + 1], float(inputs["timestep"][b]),
                            encoder_hidden_states=inputs["encoder_hidden_states"][b:b + 1]).sample)
    finally:
        unet.set_attn_processor(saved)
    return torch.cat(out)


def _run(session, inputs):
    return torch.from_numpy(session.run(None, {k: v.numpy() for k, v in inputs.items()})[0])


# ---- the export -------------------------------------------------------------------------------
def test_export_files_manifest_and_checker(onnx_dir, engine):
    manifest = json.loads((onnx_dir / "manifest.json").read_text())
    assert manifest["model_id"] == engine.components.model_id
    assert manifest["cones2_version"] == cones2.__version__
    assert manifest["opset"] >= 18 and manifest["dtype"] == "fp32" and manifest["static_shape"] is None
    assert manifest["unet_levels"] == {"count": 3, "weight_inputs": ["weight_0", "weight_1", "weight_2"]}
    for name in ("unet", "text_encoder", "vae_decoder"):
        path = onnx_dir / manifest["models"][name]["file"]
        onnx.checker.check_model(str(path), full_check=True)
        assert manifest["models"][name]["verified"]["max_abs_err"] < 1e-4
    assert manifest["models"]["unet"]["verified"]["layout_inputs_live"] is True

    model = onnx.load(str(onnx_dir / "unet.onnx"), load_external_data=False)
    assert {o.domain: o.version for o in model.opset_import}[""] == manifest["opset"] == 18
    dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in model.graph.input}
    assert dims == {"sample": ["batch", 4, "latent_height", "latent_width"], "timestep": ["batch"],
                    "encoder_hidden_states": ["batch", 77, 32], "coef": ["batch"],
                    "weight_0": ["batch", "n0", 77], "weight_1": ["batch", "n1", 77], "weight_2": ["batch", "n2", 77]}


@pytest.mark.parametrize("images,height,width", [(1, 64, 64), (2, 128, 192)])
def test_unet_matches_spec_reference(onnx_dir, engine, images, height, width):
    """Two sizes (square, non-square) and two batch sizes, guided and unguided rows in one batch."""
    inputs, maps = _unet_case(engine, images, height, width, seed=images)
    got = _run(_session(onnx_dir, "unet"), inputs)
    want = _spec_unet(engine, inputs, maps)
    err = (got - want).abs().max().item()
    print(f"unet {images}x{height}x{width}: max abs err vs SPEC reference {err:.3g}")
    assert got.shape == want.shape and err < UNET_ATOL


def test_unet_layout_inputs_are_live(onnx_dir, engine):
    session = _session(onnx_dir, "unet")
    inputs, _ = _unet_case(engine, 2, 128, 128, seed=5)
    base = _run(session, inputs)
    moved, _ = _unet_case(engine, 2, 128, 128, seed=5, shift=0.3)       # same everything, boxes moved
    assert not torch.equal(moved["weight_0"], inputs["weight_0"])
    after = _run(session, moved)
    per_row = (after - base).abs().flatten(1).max(dim=1).values
    assert (per_row[:2] > 1e-3).all(), per_row        # guided rows follow the layout
    assert (per_row[2:] == 0).all(), per_row          # unguided rows (coef 0) ignore it
    for level in range(3):                            # each level's map on its own is live
        one = dict(inputs)
        one[f"weight_{level}"] = moved[f"weight_{level}"]
        assert (_run(session, one) - base)[:2].abs().max() > 1e-4, level
    stronger = dict(inputs, coef=inputs["coef"] * 2)
    assert (_run(session, stronger) - base)[:2].abs().max() > 1e-3


@pytest.mark.parametrize("batch,height,width", [(1, 64, 64), (2, 128, 192)])
def test_vae_decoder_and_text_encoder_match_torch(onnx_dir, engine, batch, height, width):
    g = torch.Generator().manual_seed(batch)
    latent = torch.randn(batch, 4, height // 8, width // 8, generator=g)
    with torch.no_grad():
        want = engine.vae.decode(latent / engine.vae.config.scaling_factor).sample
    got = _run(_session(onnx_dir, "vae_decoder"), {"latent": latent})
    assert got.shape == (batch, 3, height, width)
    assert (got - want).abs().max() < 1e-4
    prompts = [PROMPT, "", "a mug"][: batch + 1]
    ids = torch.tensor([ref._prompt_ids(engine.tokenizer, p) for p in prompts])
    with torch.no_grad():
        want = ref.encode_prompt(engine.text_encoder, engine.tokenizer, prompts[0])
    got = _run(_session(onnx_dir, "text_encoder"), {"input_ids": ids})
    assert got.shape == (len(prompts), 77, 32)
    assert (got[:1] - want).abs().max() < 1e-4


def test_ort_text_encoder_and_vae_classes(onnx_dir, engine):
    from cones2.export.ort_backend import OrtTextEncoder, OrtVaeDecoder

    embeddings = OrtTextEncoder(onnx_dir)(torch.tensor([ref._prompt_ids(engine.tokenizer, PROMPT)]))
    assert (embeddings - engine.encode([PROMPT])).abs().max() < 1e-4
    latents = torch.randn(1, 4, 16, 16)
    pixels = OrtVaeDecoder(onnx_dir)(latents)
    assert pixels.dtype == np.uint8 and np.abs(pixels.astype(int) - engine.decode(latents).astype(int)).max() <= 1


# ---- the engine backend -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ort_engine(onnx_dir):
    return cones2.Engine.from_pretrained(None, backend="onnxruntime", backend_options={"onnx_dir": str(onnx_dir)})


@pytest.mark.parametrize("negative_weight", [-1e8, -20.0])
def test_engine_onnxruntime_generates_the_sdpa_image(engine, ort_engine, negative_weight):
    """Guided and unguided steps (guidance_steps < steps), two subjects, a hard and a soft mask;
    tolerance: latents 1e-4, pixels at most 1 level of 255."""
    layout = cones2.Layout.from_boxes({"dog": (0.05, 0.35, 0.5, 0.95), "mug": (0.55, 0.45, 0.95, 0.95)})
    kw = dict(layout=layout, steps=4, guidance_steps=2, seed=3, height=128, width=128, progress=False,
              negative_weight=negative_weight)
    a = engine.generate(PROMPT, **kw)
    b = ort_engine.generate(PROMPT, **kw)
    err = (a.latents - b.latents).abs().max().item()
    print(f"engine onnxruntime vs sdpa: latents max abs err {err:.3g}")
    assert err < LATENT_ATOL
    assert np.abs(np.asarray(a.image, dtype=int) - np.asarray(b.image, dtype=int)).max() <= 1


def test_engine_onnxruntime_batch_of_guided_and_unguided_requests(engine, ort_engine):
    layout = cones2.Layout.from_boxes({"dog": (0.1, 0.2, 0.6, 0.9)})
    reqs = lambda e: [e.request(PROMPT, layout=layout, height=128, width=192, steps=3, seed=1),  # noqa: E731
                      e.request("a mug", height=128, width=192, steps=3, seed=2)]
    a = engine.generate_batch(reqs(engine), progress=False)
    b = ort_engine.generate_batch(reqs(ort_engine), progress=False)
    for x, y in zip(a, b):
        assert (x.latents - y.latents).abs().max() < LATENT_ATOL


def test_engine_onnxruntime_errors(onnx_dir, tiny_model_dir, tmp_path):
    # without onnx_dir the export is cached on first use (tests/test_cpu_default.py), from CPU fp32 only
    with pytest.raises(Cones2Error, match="onnx_dir: the cached ONNX export is made from a CPU fp32 engine"):
        cones2.Engine.from_pretrained(None, backend="onnxruntime", dtype="bf16")
    with pytest.raises(Cones2Error, match="not found"):
        cones2.Engine.from_pretrained(None, backend="onnxruntime", backend_options={"onnx_dir": str(tmp_path / "no")})
    with pytest.raises(Cones2Error, match="exported from model"):  # another checkpoint than the export's
        cones2.Engine.from_pretrained(tiny_model_dir, backend="onnxruntime", backend_options={"onnx_dir": str(onnx_dir)})


# ---- the CLI ----------------------------------------------------------------------------------
def test_cli_generate_onnxruntime_matches_sdpa(onnx_dir, tmp_path, capsys):
    from cones2.cli import main

    args = ["generate", "--prompt", PROMPT, "--box", "dog=0.05,0.35,0.5,0.95", "--box", "mug=0.55,0.45,0.95,0.95",
            "--steps", "3", "--resolution", "128", "--seed", "4", "--no-progress"]
    assert main(args + ["--backend", "onnxruntime", "--onnx", str(onnx_dir), "--out", str(tmp_path / "ort.png")]) == 0
    assert main(args + ["--backend", "sdpa", "--out", str(tmp_path / "sdpa.png")]) == 0
    a = np.asarray(Image.open(tmp_path / "ort.png"), dtype=int)
    b = np.asarray(Image.open(tmp_path / "sdpa.png"), dtype=int)
    assert a.shape == (128, 128, 3) and np.abs(a - b).max() <= 1
    assert main(args + ["--backend", "onnxruntime", "--onnx", str(tmp_path / "missing"), "--out", str(tmp_path / "x.png")]) == 2
    assert "onnx_dir" in capsys.readouterr().err


def test_cli_export_user_errors(tmp_path, capsys):
    from cones2.cli import main

    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("x")
    assert main(["export", "onnx", "--out", str(tmp_path / "o"), "--opset", "17"]) == 2
    assert "opset" in capsys.readouterr().err
    assert main(["export", "onnx", "--out", str(tmp_path / "full")]) == 2
    assert "not empty" in capsys.readouterr().err
    assert main(["export", "onnx", "--out", str(tmp_path / "o"), "--static-shape", "100x64", "--no-progress"]) == 2
    assert "static_shape" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


# ---- slower variants (make test-slow) -----------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("dtype,static", [("fp32", "128x192"), ("fp16", None)])
def test_export_static_shape_and_fp16(tmp_path, dtype, static):
    from cones2.export.onnx_export import export_onnx

    manifest = export_onnx(None, tmp_path / "o", dtype=dtype, static_shape=static, progress=False)
    assert manifest["verified"] and manifest["models"]["unet"]["verified"]["layout_inputs_live"]
    model = onnx.load(str(tmp_path / "o" / "unet.onnx"), load_external_data=False)
    dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in model.graph.input}
    if static:
        assert dims["sample"] == ["batch", 4, 16, 24] and dims["weight_0"] == ["batch", 384, 77]
    else:
        assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16
        assert model.graph.input[4].type.tensor_type.elem_type == onnx.TensorProto.FLOAT  # rectification in fp32
