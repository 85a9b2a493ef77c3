"""Hostile checkpoints, flaky networks and bad inputs end in a clear RelZoo error: never a hang, a silent
wrong load, a connection while offline, or a stale cache (SECURITY.md's table, check by check)."""
from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import socket
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import save_file

import zoo
from _http_server import serve
from conftest import subprocess_env
from zoo import convert, weights
from zoo.checkpoint import compare_state_dicts, load_checkpoint, load_into
from zoo.cli import main
from zoo.config import KWARG_LIMITS
from zoo.convert import HOOKS, list_maps, load_map
from zoo.errors import (CheckpointError, ConfigError, ConversionError, HashMismatchError, InputError, InputTypeError,
                        OfflineError,
                        OpsError, UploadError, WeightsError, ZooError)
from zoo.factory import MAX_MODEL_ELEMENTS, convert_checkpoint

REPO_ROOT = Path(__file__).resolve().parents[1]
DATA = os.urandom(200_000)
DATA_SHA = hashlib.sha256(DATA).hexdigest()


@pytest.fixture(autouse=True)
def _hub_env(monkeypatch, one_torch_thread):
    """Hub files into RELZOO_HOME; online and with RelZoo's default timeouts unless a test says otherwise."""
    for var in ("HF_HOME", "HF_HUB_CACHE", "HF_HUB_OFFLINE", "RELZOO_OFFLINE", "HF_TOKEN", "HF_ENDPOINT",
                "RELZOO_DOWNLOAD_TIMEOUT", "RELZOO_DOWNLOAD_STALL_TIMEOUT", "HF_HUB_DOWNLOAD_TIMEOUT"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("RELZOO_NO_PROGRESS", "1")
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def _toy_state() -> dict:
    torch.manual_seed(0)
    return zoo.create_model("rpa_cifar_toy").state_dict()


# ---------------------------------------------------------------------------------------------
# Offline: no socket for any kind of source
# ---------------------------------------------------------------------------------------------


class _NoNetwork:
    """While active, every way to open a connection, resolve a name or start the Hub downloader process fails
    loudly and is recorded in ``opened`` (a test asserts it stays empty)."""

    def __init__(self, monkeypatch):
        self.monkeypatch, self.opened = monkeypatch, []

    def __enter__(self):
        def refuse(what):
            def call(*args, **kwargs):
                self.opened.append((what, args[:2]))
                raise AssertionError(f"offline, yet {what}{args[:2]}")
            return call

        self.context = self.monkeypatch.context()
        patch = self.context.__enter__()
        patch.setattr(socket.socket, "connect", refuse("socket.connect"))
        patch.setattr(socket.socket, "connect_ex", refuse("socket.connect_ex"))
        patch.setattr(socket, "create_connection", refuse("socket.create_connection"))
        patch.setattr(socket, "getaddrinfo", refuse("socket.getaddrinfo"))
        patch.setattr(weights.subprocess, "Popen", refuse("subprocess.Popen"))
        return self

    def __exit__(self, *exc):
        self.context.__exit__(*exc)
        return False


def _folder_files(tmp_path) -> dict[str, bytes]:
    folder = zoo.save_pretrained(zoo.create_model("rpa_cifar_toy"), tmp_path / "saved")
    return {p.name: p.read_bytes() for p in folder.iterdir()}


def test_offline_opens_no_socket_for_any_source(tmp_path, monkeypatch):
    """Cached and uncached: an hf:// file, an hf:// folder (and one with only pytorch_model.bin), a URL and a
    local file. Cached ones are served, uncached ones are OfflineErrors naming them; not one connection."""
    files = _folder_files(tmp_path)
    buffer = io.BytesIO()
    torch.save(_toy_state(), buffer)
    repos = {"org/folder": files, "org/bin": {"pytorch_model.bin": buffer.getvalue()}}
    local = tmp_path / "local.safetensors"
    local.write_bytes(files["model.safetensors"])
    with serve({"/w/a.bin": DATA}, hf_repos=repos) as server:
        monkeypatch.setenv("HF_ENDPOINT", server.endpoint)
        url = server.url("/w/a.bin")
        cached = {"hf file": weights.fetch("hf://org/folder/model.safetensors"),  # online: the caches fill
                  "hf folder": weights.fetch("hf://org/folder"), "hf bin folder": weights.fetch("hf://org/bin"),
                  "url": weights.fetch(url)}
        requests = server.count()
        monkeypatch.setenv("RELZOO_OFFLINE", "1")
        with _NoNetwork(monkeypatch) as guard:
            assert weights.fetch("hf://org/folder/model.safetensors") == cached["hf file"]
            assert weights.fetch("hf://org/folder") == cached["hf folder"]
            assert weights.fetch("hf://org/bin") == cached["hf bin folder"]  # the cache knows it has no safetensors
            assert weights.fetch(url, sha256=DATA_SHA) == cached["url"]
            assert weights.fetch(local) == local
            assert isinstance(zoo.from_pretrained("hf://org/folder"), torch.nn.Module)
            assert set(weights.load_state_dict("hf://org/bin")) == set(_toy_state())
            for uncached in ("hf://org/folder/other.safetensors", "hf://org/other", "hf://org/other@v1/model.safetensors",
                             server.url("/w/other.bin"), "https://download.example.org/w.pth"):
                with pytest.raises(OfflineError, match="offline mode"):
                    weights.fetch(uncached)
            monkeypatch.delenv("HF_ENDPOINT")  # the real Hub's address: not even a name lookup
            with pytest.raises(OfflineError):
                weights.fetch("hf://someone/somewhere/model.safetensors")
            with pytest.raises(WeightsError, match="not found"):
                weights.fetch(tmp_path / "missing.pth")
            with pytest.raises(UploadError, match="offline mode"):
                zoo.push_to_hub(zoo.create_model("rpa_cifar_toy"), "org/new")
        assert server.count() == requests
    assert guard.opened == []


# ---------------------------------------------------------------------------------------------
# Downloads: a deadline, a stall timeout, retries from the bytes received
# ---------------------------------------------------------------------------------------------


def test_a_trickling_server_meets_the_download_deadline(monkeypatch):
    monkeypatch.setenv("RELZOO_DOWNLOAD_TIMEOUT", "1.5")
    with serve({"/slow.bin": DATA}, trickle=0.05) as server:  # one byte every 50 ms: 10^4 s for the file
        started = time.monotonic()
        with pytest.raises(WeightsError, match="did not finish within 1.5 s .RELZOO_DOWNLOAD_TIMEOUT.") as info:
            weights.fetch(server.url("/slow.bin"))
        assert time.monotonic() - started < 6
        assert "resumes the partial file" in str(info.value)  # the server supports ranges: the bytes are kept
    assert not [p for p in weights.hub_dir().rglob("slow.bin")]  # nothing complete in the cache


def test_a_stall_is_retried_from_the_bytes_received(monkeypatch):
    monkeypatch.setenv("RELZOO_DOWNLOAD_STALL_TIMEOUT", "0.5")
    with serve({"/big.bin": DATA}, stall={"/big.bin": (100_000, 3.0)}) as server:
        path = weights.fetch(server.url("/big.bin"), sha256=DATA_SHA)
        assert path.read_bytes() == DATA
        gets = [headers for method, p, headers in server.requests if method == "GET" and p == "/big.bin"]
        assert len(gets) == 2 and gets[1].get("Range") == "bytes=100000-"  # nothing received was lost


def _hf_downloaders() -> list[int]:
    """Our child processes that run the Hub downloader script."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and int((proc / "stat").read_text().split(")")[-1].split()[1]) == os.getpid() \
                    and "hf_hub_download" in (proc / "cmdline").read_text(errors="replace"):
                found.append(int(proc.name))
        except (OSError, ValueError, IndexError):
            continue
    return found


def test_an_hf_download_meets_the_deadline_and_leaves_no_process(monkeypatch):
    monkeypatch.setenv("RELZOO_DOWNLOAD_TIMEOUT", "3")
    with serve(hf_repos={"org/slow": {"model.safetensors": DATA}}, trickle=0.05) as server:
        monkeypatch.setenv("HF_ENDPOINT", server.endpoint)
        started = time.monotonic()
        with pytest.raises(WeightsError, match="did not finish within 3 s .RELZOO_DOWNLOAD_TIMEOUT."):
            weights.fetch("hf://org/slow/model.safetensors")
        assert time.monotonic() - started < 10
        assert _hf_downloaders() == []


# ---------------------------------------------------------------------------------------------
# Pins and the conversion cache
# ---------------------------------------------------------------------------------------------


def _corrupt(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.unlink()  # a HF blob may be read-only
    path.write_bytes(bytes(data))
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 10**9))


def test_an_unpinned_download_is_pinned_by_its_first_download():
    with serve({"/w/a.bin": DATA}) as server:
        url = server.url("/w/a.bin")
        path = weights.fetch(url)  # no sha256 in any config: the first download's hash is the pin
        assert json.loads(weights._record_path(path).read_text())["sha256"] == DATA_SHA
        _corrupt(path)
        assert weights.fetch(url).read_bytes() == DATA  # deleted and fetched again, not re-hashed and served
        assert server.count("GET", "/w/a.bin") == 2
        server.files["/w/a.bin"] = b"another file behind the same URL"
        _corrupt(path)
        with pytest.raises(HashMismatchError, match=f"(?s)expected {DATA_SHA}.*first downloaded"):
            weights.fetch(url)
        assert not path.exists()


def test_an_unpinned_hf_file_is_pinned_by_its_first_download(monkeypatch):
    with serve(hf_repos={"org/repo": {"model.safetensors": DATA}}) as server:
        monkeypatch.setenv("HF_ENDPOINT", server.endpoint)
        path = weights.fetch("hf://org/repo/model.safetensors")
        _corrupt(path.resolve())
        assert weights.fetch("hf://org/repo/model.safetensors").read_bytes() == DATA
        assert server.count("GET", "/org/repo/resolve/main/model.safetensors") == 2


def test_the_conversion_cache_is_verified_on_read(tmp_path, monkeypatch):
    source = zoo.models.resnet.ResNet(layers=(1, 1, 1, 1), width_div=16, num_classes=3)
    torch.save(source.state_dict(), tmp_path / "w.pth")

    def target():
        return zoo.models.resnet.ResNet(layers=(1, 1, 1, 1), width_div=16, num_classes=3)

    first = weights.load_state_dict(tmp_path / "w.pth", converter="torchvision-resnet", model=target())
    (cached,) = (weights.hub_dir() / "converted").rglob("*.safetensors")
    conversions = []
    original = convert.convert_state_dict
    monkeypatch.setattr(convert, "convert_state_dict", lambda *a, **k: conversions.append(1) or original(*a, **k))
    weights.load_state_dict(tmp_path / "w.pth", converter="torchvision-resnet", model=target())
    assert conversions == []  # the intact file is read
    for damage in ("truncate", "flip", "no record"):
        if damage == "truncate":
            cached.write_bytes(cached.read_bytes()[:-100])
        elif damage == "flip":
            _corrupt(cached)
        else:
            weights._record_path(cached).unlink()
        again = weights.load_state_dict(tmp_path / "w.pth", converter="torchvision-resnet", model=target())
        assert again.keys() == first.keys() and all(torch.equal(again[k], first[k]) for k in first)
    assert len(conversions) == 3  # each damaged file was converted again


# ---------------------------------------------------------------------------------------------
# Dtypes and non-finite weights
# ---------------------------------------------------------------------------------------------


def test_dtypes_are_compared_and_only_lossless_changes_load():
    target = {"w": torch.zeros(4), "n": torch.zeros((), dtype=torch.int64)}
    weights_of = {"int64": torch.arange(4), "bool": torch.ones(4, dtype=torch.bool),
                  "relabelled bytes": torch.rand(4).view(torch.int32), "lossy float64": torch.rand(4, dtype=torch.float64),
                  "complex": torch.zeros(4, dtype=torch.complex64)}
    for what, value in weights_of.items():
        report = compare_state_dicts({"w": value, "n": target["n"]}, target)
        assert list(report.wrong_dtype) == ["w"] and not report.ok, what
        assert "wrong dtype" in report.format()
    lossless = {"w": torch.rand(4).half(), "n": torch.tensor(5, dtype=torch.int32)}
    report = compare_state_dicts(lossless, target)
    assert report.ok and report.cast == {"w": ("float16", "float32"), "n": ("int32", "int64")}
    assert compare_state_dicts({"w": torch.rand(4).double().float().double(), "n": target["n"]}, target).ok
    assert not compare_state_dicts({"w": torch.zeros(4), "n": torch.tensor(2.0)}, target).ok  # a float counter


def test_a_silently_cast_checkpoint_is_refused_by_create_model(tmp_path):
    state = _toy_state()
    key = "fc.weight"
    state[key] = (state[key] * 1000).to(torch.int64)  # max |w| 0.23 would have loaded as integers up to 234
    save_file(state, tmp_path / "w.safetensors")
    with pytest.raises(ConversionError, match=r"fc\.weight: weights int64 vs model float32"):
        zoo.create_model("rpa_cifar_toy", weights=str(tmp_path / "w.safetensors"))


def test_nonfinite_weights_are_an_error_naming_them(tmp_path):
    state = _toy_state()
    state["fc.bias"] = state["fc.bias"].clone()
    state["fc.bias"][3] = float("nan")
    state["layer1.0.weight"] = state["layer1.0.weight"].clone()
    state["layer1.0.weight"].view(-1)[:2] = float("inf")
    save_file(state, tmp_path / "w.safetensors")
    with pytest.raises(ConversionError, match=r"NaN or inf in 2 tensors: .*fc\.bias \(1 values\).*allow_nonfinite") as info:
        zoo.create_model("rpa_cifar_toy", weights=str(tmp_path / "w.safetensors"))
    assert "layer1.0.weight (2 values)" in str(info.value)
    model = zoo.create_model("rpa_cifar_toy", weights=str(tmp_path / "w.safetensors"), allow_nonfinite=True)
    assert torch.isnan(model.fc.bias[3])
    model = zoo.create_model("rpa_cifar_toy")
    with pytest.raises(ConversionError, match="NaN or inf"):
        load_into(model, state)
    assert not torch.isnan(model.fc.bias).any()  # nothing was loaded


# ---------------------------------------------------------------------------------------------
# Sizes a checkpoint or a config.json implies
# ---------------------------------------------------------------------------------------------


def _folder_with_kwargs(tmp_path, kwargs, name="rpa_cifar_toy") -> Path:
    folder = zoo.save_pretrained(zoo.create_model(name), tmp_path / "folder")
    config = json.loads((folder / "config.json").read_text())
    config["kwargs"] = kwargs
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize("kwargs, message", [
    ({"num_classes": 1e11}, r"kwarg 'num_classes' is a size: expected an integer in \[0, 100000\]"),
    ({"num_classes": 2_000_000}, r"kwarg 'num_classes' = 2000000 is outside \[0, 100000\]"),
    ({"num_classes": -5}, r"kwarg 'num_classes' = -5 is outside"),
    ({"num_classes": "10"}, r"kwarg 'num_classes' = '10' \(str\) is not what rpa_cifar_toy takes \(int\)"),
    ({"rpa_interpolation": 7}, r"kwarg 'rpa_interpolation' = 7 \(int\) is not what rpa_cifar_toy takes \(str\)"),
    ({"bug_compatible": "yes"}, r"kwarg 'bug_compatible' .* takes \(bool\)"),
    ({"no_such_kwarg": 1}, r"do not build rpa_cifar_toy \(TypeError: .*no_such_kwarg"),
    ({"rpa_kernel_size": 256}, r"kwarg 'rpa_kernel_size' = 256 is outside \[0, 255\]"),
    ({"x": [[[[[1]]]]]}, r"nests lists or mappings deeper than 4"),
    ({"x": list(range(100))}, r"has 100 entries \(bound 64\)"),
    ({"x": 10**30}, r"exceeds the bound 1048576"),
])
def test_folder_kwargs_are_checked_before_anything_is_built(tmp_path, kwargs, message):
    folder = _folder_with_kwargs(tmp_path, kwargs)
    started = time.monotonic()
    with pytest.raises(WeightsError, match=message):
        zoo.from_pretrained(folder)
    with pytest.raises(WeightsError, match=message):
        zoo.create_model("rpa_cifar_toy", weights=str(folder))
    assert time.monotonic() - started < 10


def test_a_model_too_large_for_its_file_is_refused_before_it_is_allocated(tmp_path):
    folder = _folder_with_kwargs(tmp_path, {"height": 8192, "width": 8192}, name="rga_sc_mini")
    with pytest.raises(WeightsError, match=f"parameters and buffers, over the bound of {MAX_MODEL_ELEMENTS:,}"):
        zoo.from_pretrained(folder)
    assert KWARG_LIMITS["height"] == 8192  # within the per-kwarg bound: the built size is what refuses it


def _rsa_checkpoint(path: Path, block: int, stage: int = 1) -> Path:
    state = {"module.base_model.conv1.weight": torch.zeros(8, 3, 1, 7, 7), "module.new_fc.weight": torch.zeros(8, 256, 1)}
    for s in range(1, 5):
        state[f"module.base_model.layer{s}.0.conv1.weight"] = torch.zeros(8, 8, 1, 1, 1)
    state[f"module.base_model.layer{stage}.{block}.conv1.weight"] = torch.zeros(8, 8, 1, 1, 1)
    torch.save({"state_dict": state}, path)
    return path


def test_a_checkpoint_cannot_ask_for_a_hundred_million_blocks(tmp_path):
    path = _rsa_checkpoint(tmp_path / "rsa.pth.tar", block=99_999_999)
    started = time.monotonic()
    with pytest.raises(ConversionError, match=r"blocks of layer1 are numbered \[0, 99999999\], not 0..1"):
        convert_checkpoint(path, "rsa", tmp_path / "out")
    assert time.monotonic() - started < 10 and not (tmp_path / "out").exists()


def test_a_checkpoint_cannot_ask_for_two_million_classes(tmp_path):
    rows = torch.zeros(1, 1).expand(2_000_000, 256)  # stride 0: the file stays small, the shape is what counts
    torch.save({"state_dict": {"cls.weight": rows}}, tmp_path / "rga.pth.tar")
    assert (tmp_path / "rga.pth.tar").stat().st_size < 100_000
    started = time.monotonic()
    with pytest.raises(CheckpointError, match=r"kwarg 'num_classes' = 2000000 is outside \[0, 100000\]"):
        convert_checkpoint(tmp_path / "rga.pth.tar", "rga", tmp_path / "out", model_name="rga_sc_mini")
    assert time.monotonic() - started < 10


# ---------------------------------------------------------------------------------------------
# Only RelZoo's errors, with the real reason and the cause chained
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("checkpoint, map_name, model_name", [
    ({"state_dict": "not a dict"}, "rga", "rga_sc_mini"),
    ({"state_dict": {"cls.weight": torch.zeros(3)}}, "rga", "rga_sc_mini"),
    ({"args": "not a namespace"}, "irpe-detr", "detr_irpe_mini"),
    ({"args": {"dataset_file": ["unhashable"]}, "model": {}}, "irpe-detr", "detr_irpe_mini"),
    ({"state_dict": {"base_model.conv1.weight": torch.zeros(0, 3, 1, 7, 7),
                     **{f"base_model.layer{s}.0.conv1.weight": torch.zeros(8, 8, 1, 1, 1) for s in range(1, 5)}}},
     "rsa", "rsanet_mini"),
    ({"state_dict": {"base_model.layer1.0.conv2.H2.weight": torch.zeros(0, 1, 3, 5, 5),
                     **{f"base_model.layer{s}.0.conv1.weight": torch.zeros(8, 8, 1, 1, 1) for s in range(1, 5)}}},
     "rsa", "rsanet_mini"),
])
def test_hooks_fail_on_hostile_checkpoints_with_project_errors(tmp_path, checkpoint, map_name, model_name):
    torch.save(checkpoint, tmp_path / "ckpt.pth")
    with pytest.raises(ZooError) as info:
        convert_checkpoint(tmp_path / "ckpt.pth", map_name, tmp_path / "out", model_name=model_name)
    assert not (tmp_path / "out").exists()
    if "hook" in str(info.value):  # a hook's own failure: the cause is chained
        assert info.value.__cause__ is not None


def test_truncated_and_foreign_files_keep_the_real_reason(tmp_path):
    buffer = io.BytesIO()
    torch.save({"w": torch.ones(100, 100)}, buffer, _use_new_zipfile_serialization=False)
    (tmp_path / "legacy.pth").write_bytes(buffer.getvalue()[:600])
    with pytest.raises(CheckpointError, match="corrupt or truncated .*EOF") as info:
        load_checkpoint(tmp_path / "legacy.pth")
    assert info.value.__cause__ is not None
    for protocol in (3, 4, 5):
        (tmp_path / f"p{protocol}.pkl").write_bytes(pickle.dumps({"w": np.ones(3, np.float32)}, protocol=protocol))
        with warnings.catch_warnings(), \
                pytest.raises(CheckpointError, match=f"a pickle of protocol {protocol} using opcode .*re-save it"):
            warnings.simplefilter("ignore")  # torch notes the protocol it was not written for
            load_checkpoint(tmp_path / f"p{protocol}.pkl")


def test_zero_dimensional_numpy_arrays_keep_their_shape(tmp_path):
    (tmp_path / "p2.pkl").write_bytes(pickle.dumps({"w": np.ones((2, 3), np.float32), "s": np.array(3.0)}, protocol=2))
    loaded = load_checkpoint(tmp_path / "p2.pkl")
    assert loaded["s"].shape == () and loaded["s"].item() == 3.0 and loaded["w"].shape == (2, 3)


@pytest.mark.parametrize("source, message", [
    ("http://[::1/x", "Invalid IPv6 URL"),
    ("x" * 300 + ".pth", "not found|File name too long"),
    ("hf://org/../x.pth", "not a repo id"),
    ("hf://org/repo@/x.pth", "empty repo name or revision"),
    ("ftp://host/x.pth", "unsupported weights source"),
    ("a\0b.pth", "NUL"),
])
def test_bad_sources_are_weights_errors(source, message):
    with pytest.raises(WeightsError, match=message):
        weights.fetch(source)
    with pytest.raises(WeightsError, match=message):
        zoo.create_model("rpa_cifar_toy", weights=source)


def test_a_file_name_that_is_not_utf8_converts(tmp_path):
    name = os.fsdecode(b"ckpt-\xff\xfe.pth")  # undecodable bytes: lone surrogates in Python
    torch.save(zoo.create_model("rpa_cifar_toy").state_dict(), tmp_path / name)
    out = convert_checkpoint(tmp_path / name, "rpa-toy", tmp_path / "out", model_name="rpa_cifar_toy")
    config = json.loads((out / "config.json").read_text(encoding="utf-8"))
    assert config["source"].endswith("ckpt-\\udcff\\udcfe.pth")
    assert "ckpt-" in (out / "README.md").read_text(encoding="utf-8")


def test_create_model_reports_bad_kwargs_as_project_errors():
    with pytest.raises(ConfigError, match="no_such") as info:
        zoo.create_model("rpa_cifar_toy", no_such=1)
    assert isinstance(info.value, TypeError) and info.value.__cause__ is not None
    with pytest.raises(ConfigError, match="sasa_resnet_mini: .*divisible"):
        zoo.create_model("sasa_resnet_mini", width_div=3)


def test_the_cli_prints_one_line_and_the_traceback_with_debug(tmp_path, capsys):
    torch.save({"state_dict": {"cls.weight": torch.zeros(3)}, "epoch": 1}, tmp_path / "ckpt.pth")
    assert main(["convert", "--from", "torchvision-resnet", str(tmp_path / "ckpt.pth"), "--out", str(tmp_path / "o"),
                 "--model", "rpa_cifar_toy"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and "Traceback" not in err
    assert main(["convert", "--from", "torchvision-resnet", str(tmp_path / "ckpt.pth"), "--out", str(tmp_path / "o"),
                 "--model", "rpa_cifar_toy", "--debug"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and "ConversionError" in err
    assert main(["convert", "--from", "rga", str(tmp_path / "ckpt.pth"), "--out", str(tmp_path / "o"),
                 "--kwargs", "{not json"]) == 2
    assert capsys.readouterr().err.startswith("error: --kwargs is not valid JSON")


# ---------------------------------------------------------------------------------------------
# Conversion maps are code: the hook registry and --trust-map
# ---------------------------------------------------------------------------------------------


def test_every_packaged_hook_is_registered():
    named = {spec for name in list_maps() for spec in load_map(name).hooks.values()}
    assert named
    for name in list_maps():
        cmap = load_map(name)
        for which in cmap.hooks:
            assert cmap.hook(which) is not None
    assert named <= set(HOOKS), sorted(named - set(HOOKS))


def _evil_map(tmp_path, hook: str) -> Path:
    path = tmp_path / "evil.yaml"
    path.write_text(yaml.safe_dump({"name": "evil", "target_model": "rpa_cifar_toy", "hooks": {"model_kwargs": hook}}))
    return path


def test_a_map_from_outside_the_package_needs_trust_before_its_hooks_are_imported(tmp_path, monkeypatch, capsys):
    sentinel = tmp_path / "imported"
    (tmp_path / "evil_hooks.py").write_text(textwrap.dedent(f"""
        from pathlib import Path
        Path({str(sentinel)!r}).write_text("imported")
        def kwargs(checkpoint):
            Path({str(sentinel)!r}).write_text("ran")
            return {{}}
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    torch.save(zoo.create_model("rpa_cifar_toy").state_dict(), tmp_path / "w.pth")
    for hook in ("builtins:exec", "os:system", "evil_hooks:kwargs"):
        with pytest.raises(ConfigError, match=r"not one of RelZoo's registered hooks.*--trust-map"):
            convert_checkpoint(tmp_path / "w.pth", str(_evil_map(tmp_path, hook)), tmp_path / "out")
        assert not sentinel.exists()
    assert main(["convert", "--from", str(_evil_map(tmp_path, "evil_hooks:kwargs")), str(tmp_path / "w.pth"),
                 "--out", str(tmp_path / "out")]) == 2
    assert "--trust-map" in capsys.readouterr().err and not sentinel.exists()
    assert main(["convert", "--from", str(_evil_map(tmp_path, "evil_hooks:kwargs")), str(tmp_path / "w.pth"),
                 "--out", str(tmp_path / "out"), "--trust-map"]) == 0
    assert sentinel.read_text() == "ran"
    # a registered hook needs no trust, from any map
    assert load_map(_evil_map(tmp_path, "zoo.models.rga:kwargs_from_checkpoint")).hook("model_kwargs") is not None


def test_a_packaged_map_runs_only_registered_hooks(tmp_path, monkeypatch):
    folder = tmp_path / "convert"
    folder.mkdir()
    (folder / "sneaky.yaml").write_text(yaml.safe_dump({"name": "sneaky", "hooks": {"model_kwargs": "zoo.models.rga:_branches"}}))
    monkeypatch.setattr(convert, "convert_dir", lambda: folder)
    with pytest.raises(ConfigError, match="is not a registered conversion hook"):
        load_map("sneaky", trust_map=True).hook("model_kwargs")


# ---------------------------------------------------------------------------------------------
# Model inputs
# ---------------------------------------------------------------------------------------------

MINIS = {"sasa_resnet_mini": (3, 64, 64), "rga_sc_mini": (3, 64, 32), "rsanet_mini": (24, 64, 64),
         "detr_irpe_mini": (3, 64, 64), "handraise_rpa_mini": (3, 64, 64)}


@pytest.fixture(scope="module")
def minis():
    return {name: zoo.create_model(name).eval() for name in MINIS}


def _call(name, model, x):
    return model(list(x)) if name == "handraise_rpa_mini" else model(x)


@pytest.mark.parametrize("name", MINIS)
def test_models_check_their_inputs_before_any_layer_runs(minis, name):
    model, shape = minis[name], MINIS[name]
    bad = {"float64": (torch.rand(1, *shape, dtype=torch.float64), "float32 weights but got a torch.float64 input"),
           "half": (torch.rand(1, *shape).half(), "float32 weights but got a torch.float16 input"),
           "int64": (torch.randint(0, 255, (1, *shape)), "floating-point input, got torch.int64"),
           "uint8": (torch.randint(0, 255, (1, *shape), dtype=torch.uint8), "floating-point input, got torch.uint8"),
           "one channel": (torch.rand(1, 1, *shape[1:]), "channels|expects"),
           "rank": (torch.rand(*shape[1:]), "takes|expects")}
    if name != "handraise_rpa_mini":  # the detector resizes every image itself
        bad["too small"] = (torch.rand(1, shape[0], 8, 8), "at least|built for")
    for case, (x, message) in bad.items():
        with torch.no_grad(), pytest.raises(InputError, match=message):
            _call(name, model, x)
    with torch.no_grad():
        empty = _call(name, model, torch.rand(0, *shape))
        ok = _call(name, model, torch.rand(1, *shape))
    if isinstance(ok, torch.Tensor):
        assert empty.shape == (0, *ok.shape[1:])
    elif isinstance(ok, dict):
        assert {k: v.shape[1:] for k, v in empty.items() if isinstance(v, torch.Tensor)} == \
            {k: v.shape[1:] for k, v in ok.items() if isinstance(v, torch.Tensor)} and empty["pred_logits"].shape[0] == 0
    else:
        assert empty == []


def test_nan_input_is_an_error_on_the_detectors_predict_path(minis, monkeypatch):
    from PIL import Image

    import zoo.predict

    with torch.no_grad(), pytest.raises(InputError, match="NaN or inf"):
        minis["handraise_rpa_mini"].coco_predictions([torch.full((3, 64, 64), float("nan"))], torch.tensor([[64, 64]]))
    monkeypatch.setattr(zoo.predict, "create_transform", lambda config: lambda image: torch.full((3, 64, 64), float("inf")))
    for name in ("handraise_rpa_mini", "detr_irpe_mini"):
        with pytest.raises(InputError, match="NaN or inf"):
            zoo.predict.detect(minis[name], Image.new("RGB", (64, 64)))


def test_input_checks_compile_into_the_graph(minis):
    model = minis["sasa_resnet_mini"]
    compiled = torch.compile(model, backend="eager", fullgraph=True)  # no graph break for a check
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x))


# ---------------------------------------------------------------------------------------------
# Native builds
# ---------------------------------------------------------------------------------------------


def _op_sources(tmp_path) -> Path:
    src = tmp_path / "src" / "hardening_op"
    src.mkdir(parents=True)
    (src / "op.cpp").write_text("#include <torch/library.h>\nTORCH_LIBRARY(relzoo_hardening, m) {}\n")
    return src


def test_a_failed_build_leaves_no_temporary_folder(tmp_path, monkeypatch):
    import importlib

    build = importlib.import_module("zoo.ops.build")
    monkeypatch.setenv("RELZOO_EXTENSIONS_DIR", str(tmp_path / "ext"))
    monkeypatch.setenv("RELZOO_OPS_CUDA", "0")

    def no_ninja(env):
        raise OpsError("ninja not found: `pip install ninja`")

    monkeypatch.setattr(build, "_ninja_path_env", no_ninja)
    with pytest.raises(OpsError, match="ninja not found"):
        build.build("hardening_op", source_dir=_op_sources(tmp_path))
    assert [p.name for p in (tmp_path / "ext").iterdir() if ".tmp-" in p.name] == []


@pytest.mark.slow
def test_compilers_die_with_a_builder_killed_by_sigkill(tmp_path):
    """A builder killed with SIGKILL mid-compile takes its compiler processes with it (within a second or two)."""
    pid_file = tmp_path / "compiler.pid"
    fake = tmp_path / "fake-c++"
    fake.write_text(textwrap.dedent(f"""\
        #!/bin/sh
        case " $* " in
          *" -c "*) echo $$ > {pid_file}; exec sleep 120 ;;
        esac
        exec c++ "$@"
    """))
    fake.chmod(0o755)
    script = f"from zoo.ops.build import build; build('hardening_op', source_dir={str(_op_sources(tmp_path))!r})"
    env = subprocess_env(CXX=str(fake), RELZOO_EXTENSIONS_DIR=str(tmp_path / "ext"), RELZOO_OPS_CUDA="0")
    builder = subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not pid_file.exists() or not pid_file.read_text().strip():
            assert time.monotonic() < deadline and builder.poll() is None, "the compiler never started"
            time.sleep(0.1)
        compiler = int(pid_file.read_text())
        builder.kill()  # SIGKILL: no cleanup code of the builder runs
        builder.wait(timeout=30)
        deadline = time.monotonic() + 10
        while _alive(compiler) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _alive(compiler), "the compiler outlived the builder"
    finally:
        if builder.poll() is None:
            builder.kill()
        if pid_file.exists() and pid_file.read_text().strip() and _alive(int(pid_file.read_text())):
            os.kill(int(pid_file.read_text()), 9)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and stat.read_text().split()[2] == "Z")  # a zombie has ended


def test_relzoo_ops_values_are_validated(monkeypatch):
    from zoo.ops.backend import mode

    monkeypatch.setenv("RELZOO_OPS", "bogus")
    with pytest.raises(ConfigError, match="RELZOO_OPS='bogus' is not one of auto, native, reference"):
        mode()
    with pytest.raises(ConfigError, match="RELZOO_OPS"):
        zoo.create_model("sasa_resnet_mini").eval()(torch.rand(1, 3, 64, 64))


# ---------------------------------------------------------------------------------------------
# Layers, ops and losses: the project's error types (InputError for a call's tensors, ConfigError for a
# constructor's arguments), and still the builtin types callers caught before
# ---------------------------------------------------------------------------------------------


def _layer_and_op_errors():
    from zoo import losses
    from zoo.layers.irpe import RPEAttention
    from zoo.layers.rga import RGA_Module
    from zoo.layers.rpa import MultiheadNonlocal2d
    from zoo.layers.rsa import RSA
    from zoo.layers.sasa import SASAttention2d
    from zoo.ops import neighborhood_attention, relative_attention, rpe_index

    q = torch.rand(1, 2, 4, 8)
    cases = {
        "RPEAttention embed": (lambda: RPEAttention(dim=10, num_heads=3), ConfigError, "divisible"),
        "RPEAttention rank": (lambda: RPEAttention(dim=8, num_heads=2)(torch.rand(4, 8)), InputError, r"\(B, N, C\)"),
        "RGA_Module branches": (lambda: RGA_Module(8, 16, use_spatial=False, use_channel=False), ConfigError,
                                "at least one"),
        "RGA_Module channels": (lambda: RGA_Module(32, 16, down_ratio=2)(torch.rand(1, 4, 4, 4)), InputError, "in_channel=32"),
        "RPA heads": (lambda: MultiheadNonlocal2d(8, num_heads=0), ConfigError, "num_heads"),
        "RPA dtype": (lambda: MultiheadNonlocal2d(8)(torch.zeros(1, 8, 4, 4, dtype=torch.int64)), InputTypeError,
                      "floating"),
        "RSA kernel type": (lambda: RSA(d_in=8, d_out=8, nh=2, kernel_type="X"), ConfigError, "kernel_type"),
        "SASA padding": (lambda: SASAttention2d(8, 8, heads=2, padding_mode="wrap"), ConfigError, "padding_mode"),
        "SASA input": (lambda: SASAttention2d(8, 8, heads=2)(torch.rand(1, 3, 4, 4)), InputError, r"\(B, 8, H, W\)"),
        "relative_attention shapes": (lambda: relative_attention(q, q[..., :4], q), InputError, "relative_attention"),
        "neighborhood dtype": (lambda: neighborhood_attention(*(torch.rand(1, 1, 4, 4, 2, dtype=d) for d in
                                                                (torch.float32, torch.float64, torch.float32)),
                                                              kernel_size=3), InputTypeError, "one floating dtype"),
        "rpe_index dtype": (lambda: rpe_index(torch.zeros(2, 3, dtype=torch.int64), torch.zeros(2, 2, dtype=torch.long)),
                            InputTypeError, "rpe_index"),
        "label smoothing epsilon": (lambda: losses.CrossEntropyLabelSmooth(5, epsilon=1.0), ConfigError, "epsilon"),
        "label smoothing labels": (lambda: losses.CrossEntropyLabelSmooth(5)(torch.rand(2, 5), torch.tensor([0, 7])),
                                   InputError, r"\[0, 5\)"),
        "triplet features": (lambda: losses.TripletLoss()(torch.rand(4), torch.tensor([0, 0, 1, 1])), InputError,
                             r"\(B, D\)"),
        "giou boxes": (lambda: losses.generalized_box_iou(torch.rand(2, 3), torch.rand(2, 4)), InputError, "xyxy"),
    }
    return cases


@pytest.mark.parametrize("case", list(_layer_and_op_errors()))
def test_layers_ops_and_losses_raise_project_errors(case):
    make, error, message = _layer_and_op_errors()[case]
    with pytest.raises(error, match=message) as raised:
        make()
    assert isinstance(raised.value, TypeError if issubclass(error, TypeError) else ValueError)  # what callers caught


def test_a_constructors_config_error_is_named_after_the_model():
    with pytest.raises(ConfigError, match=r"^rga_sc_resnet50: dropout must be in \[0, 1\)"):
        zoo.create_model("rga_sc_resnet50", dropout=2.0)
