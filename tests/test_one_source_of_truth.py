"""Each choice is written once (issue 25): the backend registry's specs drive the CLI's choices,
flags, pairing and help texts, the Ray options, the compiled runner's tracing and the engine's
fallback; the mode table drives config, CLI and proto names; one default dtype per device; the
sampling defaults live in SamplingConfig alone; SPEC 3's literal attention and its hard-mask
threshold are written once (kernels/reference.py), checked against the independent reference."""
from __future__ import annotations

import argparse
import dataclasses
import inspect
import io
import os
import re
import sys
from contextlib import redirect_stdout
from pathlib import Path

import pytest
import torch

import cones2
from cones2 import backends
from cones2.backends import ATTENTION, RUNNER, BackendOption, BackendSpec
from cones2.cli import build_parser
from cones2.cli.common import backend_choice
from cones2.config import SamplingConfig
from cones2.modes import DEFAULT_MODE, MODES, mode_names

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import spec_reference as ref  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def _help(*argv: str) -> str:
    out = io.StringIO()
    with redirect_stdout(out), pytest.raises(SystemExit):
        build_parser().parse_args([*argv, "--help"])
    return "".join(out.getvalue().split())       # argparse wraps lines, even at hyphens: compare without spaces


def _squeeze(text: str) -> str:
    return "".join(text.split())


def _flags(parser_args: list[str]) -> argparse.Namespace:
    return build_parser().parse_args(parser_args)


@pytest.fixture
def plugin_runner():
    """A UNet runner registered the way a plugin registers one, with a flag-carrying option."""
    spec = BackendSpec("plugin-runner-test", RUNNER, lambda engine, **o: None, "a test runner",
                       options=(BackendOption("plugin_dir", "plugin-dir", "the test runner's folder",
                                              selects=True, made_by="make-plugin"),),
                       needs=("plugin_dir",))
    backends.register(spec)
    yield spec
    backends._SPECS.pop(spec.name)


@pytest.mark.parametrize("command", ["generate", "serve"])
def test_cli_backend_names_flags_and_help_come_from_the_registry(command, plugin_runner):
    text = _help(command)
    for spec in backends.specs():
        assert spec.name in text, f"--backend help does not name {spec.name}"
        for option in spec.options:
            if option.flag:
                assert _squeeze(f"--{option.flag} {option.metavar} {option.help}") in text, option
    compilable = [s.name for s in backends.specs() if s.compilable]
    assert _squeeze(f"composes with every attention backend ({', '.join(compilable)};") in text
    assert "plugin-runner-test" not in compilable
    if command == "generate":
        modes = re.search(r"--mode\{([^}]*)\}", text)
        assert modes and modes.group(1).split(",") == list(mode_names())


def test_backend_choice_reads_pairing_and_needs_from_the_specs(plugin_runner):
    """What `serve --ray` (no device at hand) and `check_model_flags` both call."""
    args = _flags(["serve", "--plugin-dir", "/p"])                  # the option selects its backend
    assert backend_choice(args) == ("plugin-runner-test", {"plugin_dir": "/p"})
    args = _flags(["serve", "--onnx", "/o"])
    assert backend_choice(args) == ("onnxruntime", {"onnx_dir": "/o"})
    with pytest.raises(cones2.Cones2Error, match=r"^plugin-dir: is for --backend plugin-runner-test, not sdpa$"):
        backend_choice(_flags(["serve", "--backend", "sdpa", "--plugin-dir", "/p"]))
    with pytest.raises(cones2.Cones2Error, match=r"^plugin-dir: --backend plugin-runner-test needs --plugin-dir DIR "
                                                 r"\(see `make-plugin`\)$"):
        backend_choice(_flags(["serve", "--backend", "plugin-runner-test"]))
    with pytest.raises(cones2.Cones2Error, match=r"^compile: --backend plugin-runner-test runs its own"):
        backend_choice(_flags(["serve", "--backend", "plugin-runner-test", "--plugin-dir", "/p", "--compile"]))
    with pytest.raises(cones2.Cones2Error, match=r"unknown backend 'magic'"):
        backend_choice(_flags(["serve", "--backend", "magic"]))
    with pytest.raises(cones2.Cones2Error, match=r"'tensorrt' cannot run on cpu"):
        backend_choice(_flags(["serve", "--backend", "tensorrt", "--trt", "/t"]), "cpu")
    assert backend_choice(_flags(["serve", "--backend", "tensorrt", "--trt", "/t"])) == \
        ("tensorrt", {"engine_dir": "/t"})                       # no device given: a Ray head node


def test_specs_are_consistent():
    names = set(backends.backend_names())
    for spec in backends.specs():
        if spec.fallback is not None:                              # every fallback chain ends, in a known name
            seen, name = {spec.name}, spec.fallback
            while name is not None:
                assert name in names and name not in seen, (spec.name, name)
                seen.add(name)
                name = backends.get_spec(name).fallback
        assert not (spec.traceable and spec.kind == RUNNER)
        assert set(spec.needs) <= {o.name for o in spec.options} or not spec.options
    assert backends.get_spec(backends.BASE_ATTENTION).kind == ATTENTION
    assert backends.fallback("onnxruntime", "cpu") == backends.BASE_ATTENTION
    assert backends.fallback("onnxruntime", "cpu", (ATTENTION,)) == backends.BASE_ATTENTION
    assert backends.fallback("sdpa", "cpu") is None
    with pytest.raises(ValueError, match="attention backends take no options"):
        backends.register(BackendSpec("bad", ATTENTION, object, "x", options=(BackendOption("a", "a", "a"),)))
    with pytest.raises(ValueError, match="only attention backends are traced"):
        backends.register(BackendSpec("bad", RUNNER, object, "x", traceable=True))


def test_the_compiled_runner_traces_what_the_spec_says(tiny_engine):
    from cones2.compiled import CompiledUNetRunner, OpaqueBackend

    sdpa = backends.attention_backend("sdpa")
    for traceable in (True, False):
        backends.register(BackendSpec("traced-test", ATTENTION, lambda: sdpa, "test double", traceable=traceable))
        try:
            runner = CompiledUNetRunner(tiny_engine.unet, "traced-test", "cpu")
            assert isinstance(runner.backend, OpaqueBackend) is not traceable
        finally:
            backends._SPECS.pop("traced-test")


def test_runner_options_outside_the_spec_are_refused():
    from cones2.runners import make_runner

    with pytest.raises(cones2.Cones2Error, match=r"^backend_options: backend 'tensorrt' takes no option colour; "
                                                 r"it takes engine_dir, cuda_graphs$"):
        make_runner("tensorrt", object(), engine_dir="x", colour="red")


def test_modes_table_is_read_by_config_and_names_proto_values():
    pb = pytest.importorskip("cones2.serve.cones2_pb2")
    assert mode_names()[0] == DEFAULT_MODE == SamplingConfig().mode
    for name, mode in MODES.items():
        config = SamplingConfig(mode=name)
        assert config.steps == mode.default_steps and config.guidance_steps == mode.guidance_steps(mode.default_steps)
        assert pb.SamplingMode.Value(mode.proto) != pb.SAMPLING_MODE_UNSPECIFIED
    assert MODES["paper-exact"].cpu_noise and not MODES["fast"].cpu_noise
    with pytest.raises(cones2.Cones2Error, match=r"^mode: must be one of paper-exact, fast"):
        SamplingConfig(mode="turbo")


def test_one_default_dtype_used_by_the_engine_and_the_cli():
    assert cones2.default_dtype("cuda:1") == "fp16" and cones2.default_dtype("cpu") == "fp32"
    assert inspect.signature(cones2.Engine.from_pretrained).parameters["dtype"].default is None
    from cones2.cli.common import check_model_flags

    assert check_model_flags(_flags(["generate", "--backend", "sdpa"]))["dtype"] == "fp32"


def test_sampling_defaults_are_written_once():
    """Engine.generate restates none of SamplingConfig's defaults: every sampling keyword defaults to
    None (= the config's value), and a generation with none given equals one with the config's."""
    params = inspect.signature(cones2.Engine.generate).parameters
    for f in dataclasses.fields(SamplingConfig):
        if f.name in params:
            assert params[f.name].default is None, f.name


def test_sampling_defaults_reach_the_request(tiny_engine):
    defaults = SamplingConfig()
    request = tiny_engine.request("a dog", seed=None, mode=None, guidance_weight=None, cfg_scale=None)
    for name in ("seed", "mode", "guidance_weight", "cfg_scale", "negative_weight", "steps", "layout_resize"):
        assert getattr(request.config, name) == getattr(defaults, name), name


def test_kernel_reference_matches_the_independent_reference():
    from cones2.kernels.reference import HARD_MASK, rectified_attention

    assert HARD_MASK == ref.HARD_MASK_THRESHOLD
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(3, 2, n, 8, generator=g, dtype=torch.float64) for n in (12, 77, 77))
    weight = torch.zeros(3, 12, 77, dtype=torch.float64)
    weight[:, :6, 4], weight[:, 6:, 4] = 2.5, -1e8
    weight[:, :, 9] = -1e4                                  # exactly at the threshold: masked when guided
    coef = torch.tensor([0.5, 0.0, 1e-3], dtype=torch.float64)
    got, sd = rectified_attention(q, k, v, weight, coef, 8 ** -0.5)
    for b in range(3):
        w = weight[b] if coef[b] > 0 else None
        want = ref.rectified_attention(q[b], k[b], v[b], w, float(coef[b]), 8 ** -0.5)
        torch.testing.assert_close(got[b], want, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(sd[b], torch.std(q[b] @ k[b].transpose(-1, -2)))


def _hard_mask_definitions(path: Path) -> list[int]:
    """Lines of `path` that assign a HARD_MASK name or compare against the -1e4 literal (code only)."""
    import ast

    lines = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and "HARD_MASK" in t.id for t in node.targets):
            lines.append(node.lineno)
        if isinstance(node, ast.Compare) and any(
                isinstance(c, ast.UnaryOp) and isinstance(c.op, ast.USub) and isinstance(c.operand, ast.Constant)
                and c.operand.value == 1e4 for c in node.comparators):
            lines.append(node.lineno)
    return lines


def test_hard_mask_and_the_literal_formula_are_written_once():
    """No other module defines the threshold or compares against it literally. The Triton kernel keeps
    a constexpr of its own (a Triton kernel reads constexprs, not Python globals) and
    tests/spec_reference.py stays independent on purpose."""
    allowed = {REPO / "kernels" / "reference.py", REPO / "kernels" / "triton_rectified.py"}
    offenders = []
    for folder in ("engine/cones2", "kernels", "export", "bench", "cones2_train"):
        for path in (REPO / folder).rglob("*.py"):
            if path in allowed or any(p.is_symlink() for p in path.parents):
                continue
            offenders += [f"{path.relative_to(REPO)}:{line}" for line in _hard_mask_definitions(path)]
    assert not offenders, offenders
    assert not (REPO / "kernels" / "__init__.py").exists()


def test_ray_options_and_replica_dtype_come_from_the_registry(plugin_runner, monkeypatch):
    """`serve --ray` with a device the head node may lack (no `checked` flags): every runner's flags reach
    the replicas' EngineSpec through `backend_choice`, plugins included; a replica's dtype default is
    `cones2.default_dtype` of its device."""
    pytest.importorskip("ray")
    from cones2.cli.serve import ray_options_from_args
    from cones2.serve.ray import app

    runners = [s for s in backends.specs(RUNNER) if any(o.flag for o in s.options)]
    assert plugin_runner in runners and len(runners) >= 3             # onnxruntime, tensorrt, the plugin
    for spec in runners:
        flags = [a for o in spec.options if o.flag for a in (f"--{o.flag}", f"/{o.name}")]
        args = _flags(["serve", "--ray", "--ray-grpc-every-interface", "--device", "cuda", "--port", "50051",
                       "--backend", spec.name, *flags])
        _, engine_spec = ray_options_from_args(args, "token", None)
        assert engine_spec.backend == spec.name
        assert engine_spec.backend_options == {o.name: f"/{o.name}" for o in spec.options if o.flag}
    with pytest.raises(cones2.Cones2Error, match=r"^plugin-dir: is for --backend plugin-runner-test, not sdpa$"):
        ray_options_from_args(_flags(["serve", "--ray", "--device", "cuda", "--port", "50051", "--backend", "sdpa",
                                      "--plugin-dir", "/p"]), "token", None)

    built = []
    monkeypatch.setattr(app.Engine, "from_pretrained", lambda model, **kw: built.append(kw))
    for device in ("cpu", "cuda", "cuda:1"):
        app.EngineSpec(device=device).build()
        assert built[-1]["dtype"] == cones2.default_dtype(device)


def test_the_served_mode_names_come_from_the_mode_table():
    """The service's wire mapping, the Python client and `client generate --mode` read the table."""
    pb = pytest.importorskip("cones2.serve.cones2_pb2")
    from cones2.serve.client import build_request
    from cones2.serve.validation import _MODES

    assert _MODES == {pb.SamplingMode.Value(MODES[n].proto): n for n in mode_names()} | \
        {pb.SAMPLING_MODE_UNSPECIFIED: DEFAULT_MODE}
    for name in mode_names():
        assert _MODES[build_request("a dog", mode=name).mode] == name
    modes = re.search(r"--mode\{([^}]*)\}", _help("client", "generate"))
    assert modes and modes.group(1).split(",") == list(mode_names())
