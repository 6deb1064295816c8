"""Shared fixtures: tiny SD-shaped models built once per session (v-prediction SD 2.x-like, and
epsilon SD 1.x-like with another text width), and engines on them."""
from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("TRITON_INTERPRET", "1")   # Triton kernels run on the CPU in tests
# The suite tests each backend by name against the SPEC reference; pinning the default to `sdpa` (the
# CPU default since issue 29) keeps the many engines it builds on one backend whatever the default
# becomes, so none of them exports its tiny model to ONNX. The default itself is tested with this
# unset: tests/test_cpu_default.py, tests/test_backend_registry.py, the demo tests.
os.environ.setdefault("CONES2_BACKEND", "sdpa")

from cones2.threads import configure_threads, usable_cores  # noqa: E402

# One process: the commands' default (threads fitted to the run queue at start; cones2/threads.py).
# One of N pytest-xdist workers (`make test`): its share of the usable cores, so the workers never
# oversubscribe the machine whatever order they start in.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0"))
configure_threads(max(1, usable_cores() // _WORKERS) if _WORKERS > 1 else None)


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    """Keep the test session out of the user's cache, and pin the default model to the tiny random
    one: the suite checks mechanics and numerics fast on it; the shipped demo model has its own
    end-to-end tests (tests/test_demo_world.py)."""
    if "CONES2_CACHE" not in os.environ:
        os.environ["CONES2_CACHE"] = str(tmp_path_factory.mktemp("cones2-cache"))
    from cones2.default_model import tiny_model_dir

    os.environ["CONES2_DEFAULT_MODEL"] = str(tiny_model_dir())
    yield


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """v-prediction, D=32, pads with "!" (SD 2.x-like); 128 px default, levels 16/8/4."""
    from cones2.default_model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny-v", prediction_type="v_prediction", text_dim=32)


@pytest.fixture(scope="session")
def tiny_eps_model_dir(tmp_path_factory):
    """epsilon, D=48, pads with the end token (SD 1.x-like)."""
    from cones2.default_model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny-eps", prediction_type="epsilon",
                            text_dim=48, seed=7)


@pytest.fixture(scope="session")
def tiny_engine(tiny_model_dir):
    import cones2

    return cones2.Engine.from_pretrained(tiny_model_dir, backend="sdpa")


@pytest.fixture(scope="session")
def tiny_eps_engine(tiny_eps_model_dir):
    import cones2

    return cones2.Engine.from_pretrained(tiny_eps_model_dir, backend="sdpa")


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(1234)
    yield


# `make test` runs the suite on two pytest-xdist workers (`-n 2 --dist loadfile`, Makefile): each module runs
# on one worker, and the modules of one group below run on one worker together, because they share an
# expensive resource that is then built once: a Ray cluster, the session's one CLI export of the embedded
# model (export_support.py). Grouped by module name in a scheduler of our own: xdist's `xdist_group` marks
# are silently ignored with pytest 9.2's node ids (pytest-dev/pytest-xdist#1386).
WORKER_GROUPS = {
    "ray": ("test_serve_ray.py", "test_serve_ray_cli.py"),
    "onnx-export": ("test_export_onnx.py", "test_export_trt.py", "test_work_reuse.py"),
}
_GROUP_OF = {module: group for group, modules in WORKER_GROUPS.items() for module in modules}


@pytest.hookimpl(optionalhook=True)      # xdist's hook: without xdist installed the suite still runs
def pytest_xdist_make_scheduler(config, log):
    """`--dist loadfile` with WORKER_GROUPS: a module's scope is its group's name when it has one."""
    if config.getvalue("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadFileScheduling

    class GroupedModules(LoadFileScheduling):
        def _split_scope(self, nodeid: str) -> str:
            module = nodeid.split("::", 1)[0]
            return _GROUP_OF.get(module.rsplit("/", 1)[-1], module)

    return GroupedModules(config, log)
