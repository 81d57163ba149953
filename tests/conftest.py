"""Test harness: a real ComfyUI checkout, booted in this process (ComfyUI's own executor) or as a server.

The ComfyUI checkout is $COMFYUI_PATH, else ~/comfy/ComfyUI. Without one, every test that needs ComfyUI is skipped
with that reason (printed in the header and the summary). One pytest process tests one checkout: ComfyUI's modules
are global; ``python tests/run_matrix.py`` runs the suite once per checkout."""

from __future__ import annotations

import os
import sys
from pathlib import Path

# Tiny models gain nothing from intra-op threads, and OpenMP spin-waiting makes every test crawl when several
# processes (a test server, ComfyUI's own suite) share a 2-core machine: one thread unless told otherwise.
os.environ.setdefault("OMP_NUM_THREADS", os.environ.get("MEMORA_TEST_THREADS", "1"))

import pytest  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SUPPORT = ROOT / "tests" / "support"
if str(SUPPORT) not in sys.path:
    sys.path.insert(0, str(SUPPORT))

import torch  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

from memora_batch.embedded import EmbeddedComfy, find_comfyui  # noqa: E402

COMFY_PATH = find_comfyui()
_ABSENT_REASON = ("no ComfyUI checkout: set COMFYUI_PATH or put one at ~/comfy/ComfyUI "
                  "(README: 'Getting ComfyUI'); ComfyUI-dependent tests skipped")


def comfy_version(path: Path | None = COMFY_PATH) -> str:
    if path is None:
        return "absent"
    try:
        text = (path / "comfyui_version.py").read_text()
        return text.split("__version__")[1].split('"')[1]
    except Exception:
        return "unknown"


def pytest_report_header(config):
    if COMFY_PATH is None:
        return f"ComfyUI: ABSENT - {_ABSENT_REASON}"
    return f"ComfyUI: {comfy_version()} at {COMFY_PATH}"


def pytest_collection_modifyitems(config, items):
    for item in items:
        parts = Path(str(item.fspath)).relative_to(ROOT).parts
        if len(parts) > 1 and parts[1] in ("comfy", "server", "browser", "workflows", "cluster"):
            item.add_marker(pytest.mark.comfy)
            if COMFY_PATH is None:
                item.add_marker(pytest.mark.skip(reason=_ABSENT_REASON))


def pytest_collection_finish(session):
    """Importlib mode registers each test folder as a top-level namespace module named after it (tests/server ->
    ``server``), which would shadow ComfyUI's own top-level modules (server.py, comfy/) once ComfyUI boots. The test
    modules are imported by now; drop those placeholders so ``import server`` finds ComfyUI's."""
    tests_dir = str(ROOT / "tests")
    for name, mod in list(sys.modules.items()):
        if "." in name or getattr(mod, "__file__", None) is not None:
            continue
        paths = [str(p) for p in getattr(mod, "__path__", [])]
        if paths and all(p.startswith(tests_dir) for p in paths):
            del sys.modules[name]


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    terminalreporter.write_line(f"ComfyUI tested: {comfy_version()} ({COMFY_PATH or 'absent'})")


def pack_link(base: Path) -> Path:
    """custom_nodes/comfyui-memora -> this checkout (a symlinked pack folder loads like a cloned one)."""
    cn = base / "custom_nodes"
    cn.mkdir(parents=True, exist_ok=True)
    link = cn / "comfyui-memora"
    if not link.exists():
        link.symlink_to(ROOT, target_is_directory=True)
    kit = cn / "memora_testkit"
    if not kit.exists():
        kit.symlink_to(SUPPORT / "memora_testkit", target_is_directory=True)
    return link


@pytest.fixture(scope="session")
def comfy_path() -> Path:
    """The ComfyUI checkout under test (skips when there is none)."""
    if COMFY_PATH is None:
        pytest.skip(_ABSENT_REASON)
    return COMFY_PATH


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return ROOT


@pytest.fixture(scope="session")
def testkit_dir() -> Path:
    return SUPPORT / "memora_testkit"


@pytest.fixture(scope="session")
def comfy_base(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("comfy_base")


@pytest.fixture(scope="session")
def comfy(comfy_base):
    """ComfyUI booted in this process with the pack and the test kit loaded (CPU)."""
    if COMFY_PATH is None:
        pytest.skip(_ABSENT_REASON)
    link = pack_link(comfy_base)
    return EmbeddedComfy.boot(COMFY_PATH, [link.parent / "memora_testkit", link], base_directory=comfy_base, cpu=True)


@pytest.fixture(scope="session")
def tiny_ckpt(comfy, comfy_base) -> str:
    """File name (in models/checkpoints) of a tiny random SD1.x checkpoint that stock CheckpointLoaderSimple loads."""
    import tiny_models

    name = "memora_tiny.safetensors"
    path = comfy_base / "models" / "checkpoints" / name
    if not path.exists():
        tiny_models.build_tiny_checkpoint(path, seed=0)
    return name


@pytest.fixture(scope="session")
def tiny_ckpt_path(tiny_ckpt, comfy_base) -> Path:
    return comfy_base / "models" / "checkpoints" / tiny_ckpt


def _tiny_arch_ckpt(comfy_base: Path, name: str, build) -> str:
    path = comfy_base / "models" / "checkpoints" / name
    if not path.exists():
        build(path)
    return name


@pytest.fixture(scope="session")
def tiny_sd2v_ckpt(comfy, comfy_base) -> str:
    """File name (in models/checkpoints) of a tiny random SD2.x checkpoint that stock CheckpointLoaderSimple loads as
    SD20 (a memora_testkit.TinySD20) with ModelType.V_PREDICTION (ComfyUI's own SD2 v/eps rule decides it)."""
    import tiny_models

    return _tiny_arch_ckpt(comfy_base, "memora_tiny_sd2v.safetensors",
                           lambda p: tiny_models.build_tiny_sd2_checkpoint(p, seed=0))


@pytest.fixture(scope="session")
def tiny_sd2v_ztsnr_ckpt(comfy, comfy_base) -> str:
    """The tiny SD2-v checkpoint's zero-terminal-SNR variant (same weights plus the ``ztsnr`` marker key): loads as
    V_PREDICTION with model_sampling.zsnr True (alphas_cumprod[-1] ~ 4.9e-8, sigma_max ~ 4.5e3)."""
    import tiny_models

    return _tiny_arch_ckpt(comfy_base, "memora_tiny_sd2v_ztsnr.safetensors",
                           lambda p: tiny_models.build_tiny_sd2_checkpoint(p, seed=0, ztsnr=True))


@pytest.fixture(scope="session")
def tiny_sdxl_ckpt(comfy, comfy_base) -> str:
    """File name (in models/checkpoints) of a tiny random SDXL-base checkpoint that stock CheckpointLoaderSimple loads
    as SDXL (a memora_testkit.TinySDXL, model_base.SDXL) with ModelType.EPS and a two-encoder SDXL CLIP."""
    import tiny_models

    return _tiny_arch_ckpt(comfy_base, "memora_tiny_sdxl.safetensors",
                           lambda p: tiny_models.build_tiny_sdxl_checkpoint(p, seed=0))


@pytest.fixture(scope="session")
def loaded_tiny(comfy, tiny_ckpt):
    """(MODEL, CLIP, VAE) of the tiny checkpoint, loaded through the stock CheckpointLoaderSimple."""
    import nodes

    return nodes.CheckpointLoaderSimple().load_checkpoint(tiny_ckpt)[:3]


@pytest.fixture
def output_dir(comfy, comfy_base) -> Path:
    import folder_paths

    return Path(folder_paths.get_output_directory())


@pytest.fixture
def events(comfy, monkeypatch):
    """Front-end events the nodes send: a stand-in PromptServer.instance (the in-process executor has none) that
    records each (event, data) in ``sent``."""
    import server

    class Sink:
        client_id = None
        last_node_id = None

        def __init__(self):
            self.sent = []

        def send_sync(self, event, data, sid=None):
            self.sent.append((event, data))

    sink = Sink()
    monkeypatch.setattr(server.PromptServer, "instance", sink, raising=False)
    return sink


os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
