"""The weights resolver against a local HTTP server (plain URLs and the Hugging Face resolve endpoint)."""
from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import sys
import time
from collections import OrderedDict
from pathlib import Path

import pytest
import torch

from _http_server import serve
from conftest import subprocess_env
import zoo
from zoo import convert, weights
from zoo.errors import CheckpointError, HashMismatchError, OfflineError, WeightsError
from zoo.models.resnet import ResNet

REPO_ROOT = Path(__file__).resolve().parents[1]
DATA = os.urandom(300_000)
DATA_SHA = hashlib.sha256(DATA).hexdigest()
WRONG_SHA = "0" * 64


@pytest.fixture(autouse=True)
def _hf_env(monkeypatch):
    """Hub files into RELZOO_HOME (not a user's HF cache); online unless a test says otherwise."""
    for var in ("HF_HOME", "HF_HUB_CACHE", "HF_HUB_OFFLINE", "RELZOO_OFFLINE", "HF_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("RELZOO_NO_PROGRESS", "1")
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def _cache_files() -> list[Path]:
    """Files in the cache other than lock files (what a failed download must not leave)."""
    root = weights.hub_dir()
    return [p for p in root.rglob("*") if p.is_file() and not p.name.endswith(".lock")] if root.exists() else []


def _safetensors_bytes(tensors) -> bytes:
    from safetensors.torch import save

    return save(tensors)


# ---------------------------------------------------------------------------------------------
# sources
# ---------------------------------------------------------------------------------------------


def test_parse_source(tmp_path, monkeypatch):
    s = weights.parse_source("hf://org/repo@v1.0/sub/model.safetensors")
    assert (s.kind, s.repo_id, s.revision, s.filename) == ("hf", "org/repo", "v1.0", "sub/model.safetensors")
    s = weights.parse_source("hf://org/repo")
    assert (s.repo_id, s.revision, s.filename) == ("org/repo", "main", None)
    assert weights.parse_source("https://x.org/a/b.pth").kind == "url"
    for bad in ("hf://org", "hf://org/repo@/f", "hf://org/repo/../x", "ftp://host/x"):
        with pytest.raises(WeightsError):
            weights.parse_source(bad)

    monkeypatch.chdir(tmp_path)
    (tmp_path / "here.pth").write_bytes(b"x")
    assert weights.parse_source("here.pth").path == tmp_path / "here.pth"
    # A relative path not in the current directory is looked up under the data root (configs' files).
    assert weights.parse_source("convert/torchvision-resnet.yaml").path == \
        weights.data_root() / "convert" / "torchvision-resnet.yaml"
    with pytest.raises(WeightsError, match="not found.*missing.pth"):
        weights.fetch("missing.pth")


def test_local_file_hash_mismatch_keeps_the_users_file(tmp_path):
    path = tmp_path / "mine.bin"
    path.write_bytes(DATA)
    assert weights.fetch(path, sha256=DATA_SHA) == path
    with pytest.raises(HashMismatchError, match=f"expected {WRONG_SHA}.*\n.*actual   {DATA_SHA}"):
        weights.fetch(path, sha256=WRONG_SHA)
    assert path.exists()


# ---------------------------------------------------------------------------------------------
# plain URLs
# ---------------------------------------------------------------------------------------------


def test_url_download_cache_hit_and_first_hash_record(caplog):
    with serve({"/w/a.bin": DATA}) as server:
        url = server.url("/w/a.bin")
        with caplog.at_level(logging.WARNING, logger="zoo.weights"):
            path = weights.fetch(url)
        assert path.read_bytes() == DATA and path.is_relative_to(weights.hub_dir())
        assert f"first download recorded sha256 {DATA_SHA}" in caplog.text
        assert f'"sha256": "{DATA_SHA}"' in path.with_name(path.name + ".sha256.json").read_text()

        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="zoo.weights"):
            assert weights.fetch(url) == path
            assert weights.fetch(url, sha256=DATA_SHA) == path
        assert "first download" not in caplog.text  # reported once
        assert server.count("GET", "/w/a.bin") == 1
        assert not list(path.parent.glob("*.part"))


def test_url_404():
    with serve({}) as server:
        with pytest.raises(WeightsError, match="HTTP 404"):
            weights.fetch(server.url("/nope.pth"))
    assert _cache_files() == []


def test_url_hash_mismatch_deletes_the_download():
    with serve({"/w/a.bin": DATA}) as server:
        with pytest.raises(HashMismatchError) as info:
            weights.fetch(server.url("/w/a.bin"), sha256=WRONG_SHA)
        assert WRONG_SHA in str(info.value) and DATA_SHA in str(info.value)
        assert _cache_files() == []
        # The next attempt downloads again (and succeeds with the right hash).
        assert weights.fetch(server.url("/w/a.bin"), sha256=DATA_SHA).read_bytes() == DATA
        assert server.count("GET", "/w/a.bin") == 2


def test_truncated_body_is_an_error_and_leaves_nothing():
    with serve({"/w/a.bin": DATA}, truncate=100_000, ranges=False) as server:
        with pytest.raises(WeightsError, match="truncated body: received 100000 of 300000 bytes"):
            weights.fetch(server.url("/w/a.bin"))
    assert _cache_files() == []


def test_interrupted_download_resumes_with_range_requests():
    with serve({"/w/a.bin": DATA}, truncate=120_000) as server:  # every response stops after 120 kB
        path = weights.fetch(server.url("/w/a.bin"), sha256=DATA_SHA)
        assert path.read_bytes() == DATA
        ranges = [h.get("Range") for m, p, h in server.requests if p == "/w/a.bin"]
        assert ranges == [None, "bytes=120000-", "bytes=240000-"]


def _leave_partial_download(url: str, data: bytes, etag: str) -> Path:
    """What an interrupted earlier run leaves: ``<file>.part`` and its validator sidecar."""
    path = weights._url_cache_path(url)
    part = path.with_name(path.name + ".part")
    part.parent.mkdir(parents=True, exist_ok=True)
    part.write_bytes(data)
    weights._part_meta_path(part).write_text(json.dumps({"url": url, "etag": etag, "total": len(DATA)}))
    return part


def _etag(data: bytes) -> str:
    return f'"{hashlib.sha256(data).hexdigest()[:16]}"'


def test_partial_file_is_resumed_in_a_later_call():
    with serve({"/w/a.bin": DATA}) as server:
        url = server.url("/w/a.bin")
        part = _leave_partial_download(url, DATA[:50_000], _etag(DATA))
        assert weights.fetch(url, sha256=DATA_SHA).read_bytes() == DATA
        assert [h.get("Range") for _, _, h in server.requests] == ["bytes=50000-"]
        assert not part.exists() and not weights._part_meta_path(part).exists()


@pytest.mark.parametrize("case", ["server ignores Range", "file changed since"])
def test_partial_file_restarts(case):
    with serve({"/w/a.bin": DATA}, ranges=(case != "server ignores Range")) as server:
        url = server.url("/w/a.bin")
        etag = _etag(DATA) if case == "server ignores Range" else '"an-older-version"'
        part = _leave_partial_download(url, b"bytes of another version", etag)
        assert weights.fetch(url, sha256=DATA_SHA).read_bytes() == DATA
        assert server.count("GET", "/w/a.bin") == 1
        assert not part.exists()


def test_offline_hit_and_miss(monkeypatch):
    with serve({"/w/a.bin": DATA}) as server:
        url = server.url("/w/a.bin")
        path = weights.fetch(url)
        monkeypatch.setenv("RELZOO_OFFLINE", "1")
        before = server.count()
        assert weights.fetch(url, sha256=DATA_SHA) == path
        with pytest.raises(OfflineError) as info:
            weights.fetch(server.url("/w/other.bin"))
        assert "/w/other.bin" in str(info.value) and str(weights.hub_dir()) in str(info.value)
        assert server.count() == before  # offline never touched the network


def test_reuses_torch_hub_download(tmp_path, monkeypatch):
    """A file torch.hub already fetched ($TORCH_HOME/hub/checkpoints/name-<sha prefix>.ext) is not downloaded again."""
    name = f"resnet50-{DATA_SHA[:8]}.pth"
    checkpoints = tmp_path / "torch" / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    (checkpoints / name).write_bytes(DATA)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("RELZOO_OFFLINE", "1")
    path = weights.fetch(f"https://download.example.org/models/{name}")
    assert path.read_bytes() == DATA and path.is_relative_to(weights.hub_dir())
    (checkpoints / "other-00000000.pth").write_bytes(DATA)  # its name's hash prefix does not match
    with pytest.raises(OfflineError, match="other-00000000.pth"):
        weights.fetch("https://download.example.org/models/other-00000000.pth")


_TWO_PROCESS_SCRIPT = """
import logging, os, sys, time, pathlib
logging.basicConfig(level=logging.INFO)
from zoo import weights
ready, go, url, sha = sys.argv[1:5]
pathlib.Path(ready).touch()
deadline = time.monotonic() + 120
while not os.path.exists(go) and time.monotonic() < deadline:
    time.sleep(0.01)
print(weights.fetch(url, sha256=sha))
"""


def test_two_processes_download_the_same_file_once(tmp_path):
    data = os.urandom(1 << 20)
    sha = hashlib.sha256(data).hexdigest()
    env = subprocess_env()
    with serve({"/big.bin": data}, delay=0.1) as server:  # ~1.6 s per download: the two overlap
        procs = []
        for i in range(2):
            procs.append(subprocess.Popen(
                [sys.executable, "-c", _TWO_PROCESS_SCRIPT, str(tmp_path / f"ready{i}"), str(tmp_path / "go"),
                 server.url("/big.bin"), sha], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
        try:
            deadline = time.monotonic() + 120
            while not all((tmp_path / f"ready{i}").exists() for i in range(2)):
                assert time.monotonic() < deadline and all(p.poll() is None for p in procs), \
                    [p.communicate() for p in procs if p.poll() is not None]
                time.sleep(0.02)
            (tmp_path / "go").touch()  # both start fetching at the same moment
            results = [p.communicate(timeout=120) for p in procs]
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
        assert [p.returncode for p in procs] == [0, 0], results
        paths = {out.strip().splitlines()[-1] for out, _ in results}
        assert len(paths) == 1
        assert Path(paths.pop()).read_bytes() == data
        assert server.count("GET", "/big.bin") == 1  # the second process waited and used the first's file
        assert sum("waiting for another process" in err for _, err in results) == 1, results
    assert not [p for p in _cache_files() if p.name.endswith(".part")]


# ---------------------------------------------------------------------------------------------
# Hugging Face
# ---------------------------------------------------------------------------------------------


def test_hf_file_and_folder(monkeypatch, tmp_path):
    tensors = {"a": torch.arange(4.0), "b": torch.ones(2, 2)}
    st = _safetensors_bytes(tensors)
    config = b'{"model": "some_model", "kwargs": {"num_classes": 3}, "converter": "x"}'
    torch.save({"w": torch.zeros(2)}, tmp_path / "w.bin")
    repos = {"org/converted": {"model.safetensors": st, "config.json": config},
             "org/legacy": {"pytorch_model.bin": (tmp_path / "w.bin").read_bytes()}}
    with serve(hf_repos=repos) as server:
        monkeypatch.setenv("HF_ENDPOINT", server.endpoint)  # after import: read at call time
        sha = hashlib.sha256(st).hexdigest()
        path = weights.fetch("hf://org/converted@main/model.safetensors", sha256=sha)
        assert path.read_bytes() == st and path.is_relative_to(weights.hub_dir())
        state = weights.load_state_dict(f"hf://org/converted@{server.commit}/model.safetensors", sha256=sha)
        assert torch.equal(state["a"], tensors["a"])

        # The repo root is a converted folder: safetensors preferred, config.json alongside.
        assert weights.read_folder_config("hf://org/converted") == {"model": "some_model", "kwargs": {"num_classes": 3},
                                                                      "converter": "x"}
        assert set(weights.load_state_dict("hf://org/converted")) == {"a", "b"}
        assert set(weights.load_state_dict("hf://org/legacy")) == {"w"}  # no safetensors: the .bin
        assert server.count("GET", "/org/legacy/resolve/main/pytorch_model.bin") == 1


def test_hf_404_and_hash_mismatch(monkeypatch):
    with serve(hf_repos={"org/repo": {"model.safetensors": DATA}}) as server:
        monkeypatch.setenv("HF_ENDPOINT", server.endpoint)
        with pytest.raises(WeightsError, match="not found"):
            weights.fetch("hf://org/repo/missing.safetensors")
        with pytest.raises(WeightsError, match="repository 'org/nope' not found"):
            weights.fetch("hf://org/nope/model.safetensors")
        with pytest.raises(HashMismatchError) as info:
            weights.fetch("hf://org/repo/model.safetensors", sha256=WRONG_SHA)
        assert WRONG_SHA in str(info.value) and DATA_SHA in str(info.value)
        assert not [p for p in weights.hub_dir().rglob("*") if p.is_file() and p.stat().st_size == len(DATA)]
        # The deleted file is downloaded again on the next call.
        assert weights.fetch("hf://org/repo/model.safetensors", sha256=DATA_SHA).read_bytes() == DATA


def test_hf_offline_hit_and_miss(monkeypatch):
    with serve(hf_repos={"org/repo": {"model.safetensors": DATA}}) as server:
        monkeypatch.setenv("HF_ENDPOINT", server.endpoint)
        path = weights.fetch("hf://org/repo/model.safetensors")
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        before = server.count()
        assert weights.fetch("hf://org/repo/model.safetensors", sha256=DATA_SHA) == path
        with pytest.raises(OfflineError, match=r"hf://org/repo@main/other\.safetensors.*looked in"):
            weights.fetch("hf://org/repo/other.safetensors")
        assert server.count() == before


# ---------------------------------------------------------------------------------------------
# original checkpoints: converted once
# ---------------------------------------------------------------------------------------------


def _tiny_resnet(**kw) -> ResNet:
    return ResNet(layers=(1, 1, 1, 1), width_div=16, **kw)


def test_original_checkpoint_is_converted_once(tmp_path, monkeypatch):
    original = _tiny_resnet(num_classes=1000)
    legacy = OrderedDict((k, v) for k, v in original.state_dict().items() if not k.endswith("num_batches_tracked"))
    torch.save(legacy, tmp_path / "resnet-0000.pth", _use_new_zipfile_serialization=False)
    data = (tmp_path / "resnet-0000.pth").read_bytes()
    sha = hashlib.sha256(data).hexdigest()

    with serve({"/models/resnet-0000.pth": data}) as server:
        url = server.url("/models/resnet-0000.pth")
        backbone = _tiny_resnet()  # no head: the map drops fc.*
        state = weights.load_state_dict(url, sha256=sha, converter="torchvision-resnet", model=backbone)
        assert not convert.load_into(backbone, state)
        cached = list((weights.hub_dir() / "converted" / "torchvision-resnet").rglob("*.safetensors"))
        assert len(cached) == 1 and cached[0].name.startswith(sha)
        mtime = cached[0].stat().st_mtime_ns

        def must_not_run(*args, **kwargs):
            raise AssertionError("converted again")

        with monkeypatch.context() as patch:
            patch.setattr(convert, "convert_state_dict", must_not_run)
            patch.setattr(convert, "load_checkpoint", lambda path: (
                must_not_run() if not str(path).endswith(".safetensors") else _load_st(path)))
            again = weights.load_state_dict(url, sha256=sha, converter="torchvision-resnet", model=_tiny_resnet())
            assert again.keys() == state.keys() and all(torch.equal(again[k], state[k]) for k in state)
            assert cached[0].stat().st_mtime_ns == mtime
            assert server.count("GET", "/models/resnet-0000.pth") == 1

            # Offline, the converted file still serves.
            patch.setenv("RELZOO_OFFLINE", "1")
            assert weights.load_state_dict(url, converter="torchvision-resnet", model=_tiny_resnet()).keys() == state.keys()

        # Another target layout (with the head) is its own conversion.
        head = _tiny_resnet(num_classes=1000)
        with_head = weights.load_state_dict(url, sha256=sha, converter="torchvision-resnet", model=head)
        assert not convert.load_into(head, with_head) and "fc.weight" in with_head
        assert len(list((weights.hub_dir() / "converted").rglob("*.safetensors"))) == 2


def _load_st(path):
    from safetensors.torch import load_file

    return load_file(str(path))


def test_training_container_without_converter_is_a_clear_error(tmp_path):
    torch.save({"state_dict": {"w": torch.zeros(1)}, "epoch": 3}, tmp_path / "ckpt.pth.tar")
    with pytest.raises(CheckpointError, match="top-level keys: state_dict, epoch.*converter"):
        weights.load_state_dict(tmp_path / "ckpt.pth.tar")


def test_convert_checkpoint_from_a_url(tmp_path):
    source = _tiny_resnet(num_classes=5)
    torch.save(source.state_dict(), tmp_path / "w.pth")
    with serve({"/w.pth": (tmp_path / "w.pth").read_bytes()}) as server:
        out = zoo.convert_checkpoint(server.url("/w.pth"), "torchvision-resnet", tmp_path / "out",
                                         model=_tiny_resnet(num_classes=5), model_name="tiny")
        assert weights.read_folder_config(out)["source"] == server.url("/w.pth")
        target = _tiny_resnet(num_classes=5)
        assert not convert.load_into(target, weights.load_state_dict(out))
        torch.testing.assert_close(target.fc.weight, source.fc.weight)
