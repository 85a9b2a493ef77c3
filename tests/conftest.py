"""Shared test helpers: where the golden fixtures are and how to read one case; one torch thread, tiny
synthetic datasets, and a check that an image is a picture."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
FIXTURES_ROOT = Path(os.environ.get("RELZOO_FIXTURES", REPO_ROOT.parent / "shared" / "fixtures"))


def subprocess_env(**extra: str) -> dict:
    """The environment for a child Python process that imports this checkout's zoo (first on PYTHONPATH), whether
    or not, and wherever, the package is installed; ``extra`` entries added."""
    path = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path, **extra}


def fixture_dir(family: str) -> Path:
    """``../shared/fixtures/<family>``, or skip the test with the reason when it is absent."""
    path = FIXTURES_ROOT / family
    if not path.is_dir():
        pytest.skip(f"golden fixtures for '{family}' not found at {path} (set RELZOO_FIXTURES)")
    return path


def native_op(name: str):
    """``torch.ops.relzoo`` with the native op ``name`` built and loaded (a build failure is a test failure, with
    the compiler output); skips under ``RELZOO_OPS=reference``, where native ops are disabled."""
    import torch
    from zoo import ops

    if ops.mode() == "reference":
        pytest.skip("RELZOO_OPS=reference: native ops disabled")
    ops.load(name)
    return torch.ops.relzoo


def load_case(family: str, case: str):
    """Read ``<case>.json`` and ``<case>.safetensors``: returns ``(meta: dict, tensors: dict[str, Tensor])``."""
    from safetensors.torch import load_file

    folder = fixture_dir(family)
    meta = json.loads((folder / f"{case}.json").read_text())
    st = folder / f"{case}.safetensors"
    tensors = load_file(str(st)) if st.exists() else {}
    return meta, tensors


def pytest_addoption(parser):
    parser.addoption("--export-table", metavar="PATH",
                     help="tests/test_export.py: also write the rows of README's export table to this JSON file")


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Each test gets its own RELZOO_HOME so no test reads another's cache; compiled ops stay shared."""
    home = tmp_path_factory.mktemp("relzoo_home")
    monkeypatch.setenv("RELZOO_HOME", str(home))
    monkeypatch.setenv("RELZOO_EXTENSIONS_DIR", os.environ.get(
        "RELZOO_EXTENSIONS_DIR", str(Path.home() / ".cache" / "relzoo" / "extensions")))
    yield


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a module's tests: on a shared 2-core machine more threads only add contention."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory):
    """``tiny_dataset(kind, split)``: a synthetic dataset of ``size='tiny'``, seed 0, made once per session."""
    from zoo.data.synthetic import make_dataset

    root = tmp_path_factory.mktemp("tiny-datasets")
    made = {}

    def get(kind: str, split: str = "val") -> Path:
        if (kind, split) not in made:
            made[kind, split] = make_dataset(kind, root / f"{kind}-{split}", split=split, seed=0, size="tiny")
        return made[kind, split]

    return get


def picture(data) -> "np.ndarray":
    """The image of PNG bytes or a file as an (H, W, 3) array, asserting it is a picture, not one flat colour."""
    import io

    import numpy as np
    from PIL import Image

    image = np.asarray(Image.open(io.BytesIO(data) if isinstance(data, bytes) else data).convert("RGB"))
    assert image.shape[0] > 100 and image.shape[1] > 100, f"a {image.shape[1]}x{image.shape[0]} image"
    colours = len(np.unique(image.reshape(-1, 3), axis=0))
    assert image.std() > 10 and colours > 16, f"looks blank: std {image.std():.1f}, {colours} colours"
    return image
