"""Shared test helpers: where the golden fixtures are and how to read one case."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
FIXTURES_ROOT = Path(os.environ.get("RELZOO_FIXTURES", REPO_ROOT.parent / "shared" / "fixtures"))


def fixture_dir(family: str) -> Path:
    """``../shared/fixtures/<family>``, or skip the test with the reason when it is absent."""
    path = FIXTURES_ROOT / family
    if not path.is_dir():
        pytest.skip(f"golden fixtures for '{family}' not found at {path} (set RELZOO_FIXTURES)")
    return path


def load_case(family: str, case: str):
    """Read ``<case>.json`` and ``<case>.safetensors``: returns ``(meta: dict, tensors: dict[str, Tensor])``."""
    from safetensors.torch import load_file

    folder = fixture_dir(family)
    meta = json.loads((folder / f"{case}.json").read_text())
    st = folder / f"{case}.safetensors"
    tensors = load_file(str(st)) if st.exists() else {}
    return meta, tensors


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Each test gets its own RELZOO_HOME so no test reads another's cache; compiled ops stay shared."""
    home = tmp_path_factory.mktemp("relzoo_home")
    monkeypatch.setenv("RELZOO_HOME", str(home))
    monkeypatch.setenv("RELZOO_EXTENSIONS_DIR", os.environ.get(
        "RELZOO_EXTENSIONS_DIR", str(Path.home() / ".cache" / "relzoo" / "extensions")))
    yield
