"""TensorRT side: shape contracts and optimisation profiles (no TensorRT needed), the clear errors
when TensorRT is absent or cannot run here, and a real TensorRT-RTX build (CPU) of the exported UNet
with its dynamic layout inputs when `tensorrt_rtx` is installed."""

import json
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from ci_support import import_or_skip  # noqa: E402
from export_support import exported_onnx_dir  # noqa: E402

import cones2  # noqa: E402
from cones2.errors import Cones2Error  # noqa: E402
from cones2.export.contracts import (  # noqa: E402
    ModelFacts, ShapePoint, UNetContract, check_profile, contracts, default_profile)

# Stable Diffusion 2.1: 4 latent channels, D=1024, VAE x8, 4 UNet levels, all with attention, 768 px.
SD21 = ModelFacts(in_channels=4, text_dim=1024, vae_scale=8, num_levels=4, attention_levels=(0, 1, 2, 3),
                  default_resolution=768)


def test_unet_profile_for_sd21_numbers():
    """Numbers written out by hand: latent = px / 8, level l halves (ceil) l times, N_l = h_l * w_l,
    two UNet rows (CFG) per image."""
    profile = UNetContract(SD21).profile(ShapePoint(1, 512, 512), ShapePoint(1, 768, 768), ShapePoint(4, 1024, 1536))
    assert profile["sample"] == ((2, 4, 64, 64), (2, 4, 96, 96), (8, 4, 128, 192))
    assert profile["timestep"] == ((2,), (2,), (8,))
    assert profile["coef"] == ((2,), (2,), (8,))
    assert profile["encoder_hidden_states"] == ((2, 77, 1024), (2, 77, 1024), (8, 77, 1024))
    assert profile["weight_0"] == ((2, 4096, 77), (2, 9216, 77), (8, 24576, 77))    # 64*64, 96*96, 128*192
    assert profile["weight_1"] == ((2, 1024, 77), (2, 2304, 77), (8, 6144, 77))     # 32*32, 48*48, 64*96
    assert profile["weight_2"] == ((2, 256, 77), (2, 576, 77), (8, 1536, 77))       # 16*16, 24*24, 32*48
    assert profile["weight_3"] == ((2, 64, 77), (2, 144, 77), (8, 384, 77))         # 8*8, 12*12, 16*24


def test_odd_level_sizes_round_up_like_the_unet():
    """A 704 px side: latent 88 -> 44 -> 22 -> 11 (ceil at every stride-2 conv)."""
    shapes = UNetContract(SD21).shapes(2, 704, 576)
    assert shapes["weight_3"] == (2, 11 * 9, 77)   # 576 px: 72 -> 36 -> 18 -> 9


def test_other_model_profiles_and_levels_without_attention():
    facts = ModelFacts(4, 32, 8, 3, (0, 2), 128)  # a UNet whose level 1 has no attention layer
    c = contracts(facts)
    assert c["unet"].input_names == ["sample", "timestep", "encoder_hidden_states", "coef", "weight_0", "weight_2"]
    low, opt, high = default_profile(facts)
    assert (low, opt, high) == (ShapePoint(1, 64, 64), ShapePoint(1, 128, 128), ShapePoint(4, 192, 192))
    assert c["unet"].profile(low, opt, high)["weight_2"] == ((2, 4, 77), (2, 16, 77), (8, 36, 77))
    assert c["text_encoder"].profile(low, opt, high) == {"input_ids": ((2, 77), (2, 77), (8, 77))}
    assert c["vae_decoder"].profile(low, opt, high) == {"latent": ((1, 4, 8, 8), (1, 4, 16, 16), (4, 4, 24, 24))}
    assert c["unet"].dynamic_axes()["weight_2"] == {0: "batch", 1: "n2"}


def test_default_profile_sd21_and_static():
    assert default_profile(SD21) == (ShapePoint(1, 384, 384), ShapePoint(1, 768, 768), ShapePoint(4, 1152, 1152))
    assert default_profile(SD21, (512, 768)) == (ShapePoint(1, 512, 768), ShapePoint(1, 512, 768), ShapePoint(4, 512, 768))


def test_shape_point_parsing_and_profile_checks():
    assert ShapePoint.parse("2x512x768", "min") == ShapePoint(2, 512, 768)
    assert ShapePoint.parse("1x512", "min") == ShapePoint(1, 512, 512)
    with pytest.raises(Cones2Error, match="^min:"):
        ShapePoint.parse("512", "min")
    ok = (ShapePoint(1, 512, 512), ShapePoint(1, 768, 768), ShapePoint(2, 768, 1024))
    check_profile(SD21, *ok)
    with pytest.raises(Cones2Error, match="min <= opt <= max"):
        check_profile(SD21, ShapePoint(2, 512, 512), ShapePoint(1, 768, 768), ShapePoint(2, 768, 768))
    with pytest.raises(Cones2Error, match="^max:.*multiples of 64"):
        check_profile(SD21, ok[0], ok[1], ShapePoint(2, 800, 768))
    with pytest.raises(Cones2Error, match="static shape"):
        check_profile(SD21, *ok, static=(768, 768))


# ---- TensorRT absent / unusable ------------------------------------------------------------------
def test_import_tensorrt_absent_says_how_to_get_it(monkeypatch):
    from cones2.export.trt_build import import_tensorrt

    monkeypatch.setitem(sys.modules, "tensorrt", None)        # `import tensorrt` now raises ImportError
    monkeypatch.setitem(sys.modules, "tensorrt_rtx", None)
    with pytest.raises(Cones2Error, match="^tensorrt: TensorRT is not installed.*NVIDIA"):
        import_tensorrt("tensorrt")
    with pytest.raises(Cones2Error, match="pip install tensorrt-rtx"):
        import_tensorrt("tensorrt-rtx")
    with pytest.raises(Cones2Error, match="^flavour:"):
        import_tensorrt("tensorflow")


def _fake_build(tmp_path, model_id, flavour):
    """A TensorRT build directory as `export tensorrt` writes it (the plan bytes are never read
    before the TensorRT import and the device check)."""
    d = tmp_path / f"trt-{flavour}"
    d.mkdir()
    (d / "unet.plan").write_bytes(b"not a plan")
    facts = ModelFacts(4, 32, 8, 3, (0, 1, 2), 128)
    (d / "manifest.json").write_text(json.dumps({
        "format": 1, "kind": "tensorrt", "flavour": flavour, "model_id": model_id, "dtype": "fp32",
        "facts": facts.to_dict(), "models": {"unet": {"file": "unet.plan", "profile": {}}}}))
    return d


def test_tensorrt_backend_errors(tiny_engine, tiny_model_dir, tmp_path, monkeypatch):
    from cones2.backends import why_unavailable
    from cones2.export.trt_backend import TrtUNetRunner

    model_id = tiny_engine.components.model_id
    build = str(_fake_build(tmp_path, model_id, "tensorrt"))
    # the registry refuses before anything loads: TensorRT engines need CUDA, and a TensorRT package
    with pytest.raises(Cones2Error, match="^backend: 'tensorrt' cannot run on cpu: TensorRT engines run on CUDA only; "
                                          "usable here: "):
        cones2.Engine.from_pretrained(tiny_model_dir, backend="tensorrt", backend_options={"engine_dir": build})
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: None)
    assert why_unavailable("tensorrt", "cuda") == "TensorRT is not installed (see docs/export.md)"
    monkeypatch.undo()
    # the runner's own checks, reached directly (where the registry lets it be built)
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    with pytest.raises(Cones2Error, match="^tensorrt: TensorRT is not installed"):
        TrtUNetRunner(tiny_engine, build)
    with pytest.raises(Cones2Error, match="^engine_dir:.*needs"):
        TrtUNetRunner(tiny_engine)
    with pytest.raises(Cones2Error, match="^engine_dir:.*no manifest.json"):
        TrtUNetRunner(tiny_engine, str(tmp_path))
    if _rtx() is not None:  # importable here: the next check is that it refuses the CPU
        with pytest.raises(Cones2Error, match="^device: TensorRT runs on CUDA only"):
            TrtUNetRunner(tiny_engine, str(_fake_build(tmp_path, model_id, "tensorrt-rtx")))


def test_cli_tensorrt_user_errors(tmp_path, capsys):
    from cones2.cli import main

    assert main(["generate", "--prompt", "a dog", "--backend", "tensorrt", "--out", str(tmp_path / "x.png")]) == 2
    assert "'tensorrt' cannot run on cpu: TensorRT engines run on CUDA only" in capsys.readouterr().err
    assert main(["export", "tensorrt", "--onnx", str(tmp_path), "--out", str(tmp_path / "t")]) == 2
    assert "no manifest.json" in capsys.readouterr().err


# ---- a real build with TensorRT-RTX (CPU) --------------------------------------------------------
def _rtx():
    try:
        import tensorrt_rtx
    except ImportError:
        return None
    return tensorrt_rtx


@pytest.fixture(scope="module")
def rtx():
    return import_or_skip("tensorrt_rtx", "tensorrt_rtx is not installed (pip install tensorrt-rtx); "
                                          "the TensorRT build is unverified")


def test_tensorrt_rtx_builds_the_unet_with_layout_profiles(rtx, tmp_path_factory, tmp_path, capsys):
    """The exported UNet, dynamic layout inputs included, parses and builds with our profiles."""
    from cones2.cli import main

    onnx_dir = exported_onnx_dir(tmp_path_factory)
    out = tmp_path / "rtx"
    assert main(["export", "tensorrt", "--onnx", str(onnx_dir), "--out", str(out), "--flavour", "tensorrt-rtx",
                 "--models", "unet", "--min", "1x64x64", "--opt", "1x128x128", "--max", "2x128x192",
                 "--no-progress"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["kind"] == "tensorrt" and manifest["flavour"] == "tensorrt-rtx"
    assert manifest["tensorrt_version"] == rtx.__version__
    assert (out / "unet.plan").stat().st_size > 100_000
    profile = manifest["models"]["unet"]["profile"]
    assert profile["weight_0"] == [[2, 64, 77], [2, 256, 77], [4, 384, 77]]
    assert profile["weight_2"] == [[2, 4, 77], [2, 16, 77], [4, 24, 77]]
    assert profile["sample"] == [[2, 4, 8, 8], [2, 4, 16, 16], [4, 4, 16, 24]]
    # RTX is strongly typed: FP16 kernels need an fp16 export, said plainly.
    assert main(["export", "tensorrt", "--onnx", str(onnx_dir), "--out", str(tmp_path / "f"), "--flavour",
                 "tensorrt-rtx", "--fp16"]) == 2
    assert "--dtype fp16" in capsys.readouterr().err
