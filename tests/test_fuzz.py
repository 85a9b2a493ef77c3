"""Fuzz: more than a thousand generated malformed checkpoints, folders and sources through the public paths.

Each case is a file (or folder, or source string) that must not load: truncated or garbage files of every
format, safetensors headers that lie, pickles that reference code, tensors of the wrong dtype or holding
NaN/inf, RelZoo folders whose config.json asks for absurd or mistyped kwargs, original checkpoints that
break the conversion hooks or ask for 10^8 blocks, and sources that are not sources. Every case must end
in a RelZoo error (``zoo.errors.ZooError``) within 10 s; none may load, and no pickled payload may run.
The generator is seeded, so a failure names a case that reproduces.
"""
from __future__ import annotations

import argparse
import builtins
import functools
import importlib
import io
import json
import operator
import os
import pickle
import random
import runpy
import shutil
import struct
import subprocess
import time
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
from safetensors.torch import save

import zoo
from zoo import weights
from zoo.checkpoint import load_checkpoint
from zoo.config import KWARG_LIMITS
from zoo.errors import ZooError
from zoo.factory import convert_checkpoint

SEED = 18
PER_CASE_SECONDS = 10.0
TOY = "rpa_cifar_toy"  # the cheapest registered model to build: a strict load runs in milliseconds


@dataclass
class Case:
    family: str
    name: str
    run: Callable[[], object]  # the public path; it must raise a ZooError


class Payload:
    """Pickles as ``fn(*args)``: what a hostile checkpoint asks the unpickler to call."""

    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


# ---------------------------------------------------------------------------------------------
# The generator
# ---------------------------------------------------------------------------------------------


class Fuzzer:
    def __init__(self, root: Path, rng: random.Random):
        self.root, self.rng, self.count = root, rng, 0
        torch.manual_seed(SEED)
        self.state = zoo.create_model(TOY).state_dict()
        self.floating = [k for k, v in self.state.items() if v.is_floating_point()]
        self.sentinel = root / "payload-ran"  # a payload that runs creates this
        self.canary = root / "canary"         # ... or removes this
        self.canary.mkdir()
        self.cases: list[Case] = []

    # -- files --
    def path(self, suffix: str) -> Path:
        self.count += 1
        return self.root / f"case{self.count:05d}{suffix}"

    def write(self, data: bytes, suffix: str) -> Path:
        path = self.path(suffix)
        path.write_bytes(data)
        return path

    def encode(self, obj, fmt: str) -> tuple[bytes, str]:
        """``obj`` written in one checkpoint format: (bytes, file suffix)."""
        if fmt == "safetensors":
            return save(obj), ".safetensors"
        if fmt == "pickle":
            return pickle.dumps(obj, protocol=2), ".pkl"
        buffer = io.BytesIO()
        torch.save(obj, buffer, _use_new_zipfile_serialization=fmt == "zip")
        return buffer.getvalue(), ".pth"

    def add(self, family: str, name: str, run: Callable[[], object]) -> None:
        self.cases.append(Case(family, name, run))

    def load_as_toy(self, path: Path) -> Callable[[], object]:
        return lambda: zoo.create_model(TOY, weights=str(path))

    # -- families --
    def truncated(self, per_format: int = 52) -> None:
        numpy_state = {k: v.numpy() for k, v in self.state.items()}
        for fmt in ("zip", "legacy", "safetensors", "pickle"):
            data, suffix = self.encode(numpy_state if fmt == "pickle" else self.state, fmt)
            cuts = {0, 1, 2, 7, 8, 9, 64, len(data) - 1, len(data) - 2, len(data) // 2}
            cuts |= {self.rng.randrange(1, len(data)) for _ in range(per_format - len(cuts))}
            for cut in sorted(cuts):
                path = self.write(data[:cut], suffix)
                self.add("truncated", f"{fmt} cut at {cut} of {len(data)}", self.load_as_toy(path))

    def garbage(self, n: int = 100) -> None:
        prefixes = [b"", b"PK\x03\x04", b"\x80\x02", b"\x80\x05\x95", struct.pack("<Q", 40) + b'{"a":', b"\x8a\x0a"]
        suffixes = [".pth", ".pt", ".pth.tar", ".pkl", ".t7", ".bin", ".ckpt", ".safetensors", ".tar"]
        for i in range(n):
            prefix = self.rng.choice(prefixes)
            data = prefix + self.rng.randbytes(self.rng.randrange(1, 4000))
            path = self.write(data, self.rng.choice(suffixes))
            run = (lambda p=path: weights.load_state_dict(p)) if i % 2 else self.load_as_toy(path)
            self.add("garbage", f"{len(data)} bytes after {prefix!r}", run)

    def lying_safetensors(self, n: int = 90) -> None:
        data = save(self.state)
        (length,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8:8 + length])
        body = data[8 + length:]
        keys = [k for k in header if k != "__metadata__"]
        for _ in range(n):
            h = json.loads(json.dumps(header))
            key = self.rng.choice(keys)
            lie = self.rng.choice(["length", "shape", "offsets", "dtype", "json", "permuted", "metadata", "relabel"])
            raw_length = None
            if lie == "length":
                raw_length = self.rng.choice([0, 1, len(data), 2 ** 40, 2 ** 63, length + self.rng.randrange(1, 9999)])
            elif lie == "shape":
                h[key]["shape"] = [d * self.rng.randrange(2, 1000) for d in h[key]["shape"]] or [10 ** 9]
            elif lie == "offsets":
                start, end = h[key]["data_offsets"]
                h[key]["data_offsets"] = self.rng.choice([[end, start], [start, end + 10 ** 6], [start + 1, end],
                                                          [-1, end], [0, len(body) + 1]]) if end > start else [0, 10 ** 9]
            elif lie == "dtype":
                h[key]["dtype"] = self.rng.choice(["F99", "X", "", 7, "F16", "U8", "BOOL"])
            elif lie == "permuted":
                shape = h[key]["shape"]
                if len(shape) < 2 or len(set(shape)) < 2:
                    shape = [int(np.prod(shape) or 1), 1] if shape else [1, 1]
                h[key]["shape"] = shape[::-1] if shape[::-1] != shape else shape + [1]
            elif lie == "metadata":
                h["__metadata__"] = self.rng.choice([{"format": 5}, [1, 2], "text", {"a": None}])
            elif lie == "relabel":  # the same bytes read as another 4-byte dtype: relabelled weights
                if h[key]["dtype"] == "F32":
                    h[key]["dtype"] = self.rng.choice(["I32", "U32"]) if self.rng.random() < 0.5 else "I32"
                else:
                    h[key]["dtype"] = "F32"
            text = json.dumps(h).encode()
            if lie == "json":
                cut = self.rng.randrange(1, len(text))
                text = text[:cut] + self.rng.choice([b"{", b"\x00", b"\xff", b"]"]) + text[cut + 1:]
            text += b" " * ((8 - len(text) % 8) % 8)
            blob = struct.pack("<Q", raw_length if raw_length is not None else len(text)) + text + body
            path = self.write(blob, ".safetensors")
            self.add("lying safetensors", f"{lie} of {key}", self.load_as_toy(path))

    def hostile_pickles(self) -> None:
        sentinel, canary = str(self.sentinel), str(self.canary)
        payloads = [
            Payload(os.system, f"touch {sentinel}"), Payload(builtins.exec, f"open({sentinel!r}, 'w')"),
            Payload(builtins.eval, f"open({sentinel!r}, 'w')"), Payload(builtins.__import__, "os"),
            Payload(builtins.getattr, Payload(importlib.import_module, "os"), "system"), Payload(builtins.open, sentinel, "w"),
            Payload(subprocess.Popen, ["touch", sentinel]), Payload(subprocess.check_output, ["touch", sentinel]),
            Payload(shutil.rmtree, canary), Payload(pickle.loads, pickle.dumps(1)), Payload(torch.load, sentinel),
            Payload(np.load, sentinel), Payload(functools.partial, os.system, f"touch {sentinel}"),
            Payload(operator.attrgetter, "system"), Payload(importlib.import_module, "os"),
            Payload(runpy.run_path, sentinel), Payload(os.remove, canary), Payload(os.rename, canary, sentinel),
            Payload(torch.serialization.add_safe_globals, [os.system]), Payload(builtins.print, "payload"),
        ]
        containers = [  # t(): a tensor in the file's format (a plain pickle holds numpy arrays)
            ("flat dict", lambda p, t: {"w": t(), "x": p}),
            ("state_dict container", lambda p, t: {"state_dict": {"w": t()}, "epoch": p}),
            ("list", lambda p, t: [t(), p]),
            ("OrderedDict", lambda p, t: OrderedDict(w=t(), x=p)),
            ("Namespace args", lambda p, t: {"model": {"w": t()}, "args": argparse.Namespace(lr=p)}),
            ("numpy object array", lambda p, t: {"w": np.array([p, 1], dtype=object)}),
            ("nested", lambda p, t: {"a": {"b": {"c": [p]}}}),
            ("the payload itself", lambda p, t: p),
        ]
        formats = ["zip", "legacy", "pickle"]
        for payload in payloads:
            for label, make in containers:
                fmt = self.rng.choice(formats)
                tensor = (lambda: np.zeros(2, np.float32)) if fmt == "pickle" else (lambda: torch.zeros(2))
                try:
                    data, suffix = self.encode(make(payload, tensor), fmt)
                except Exception:  # torch.save refuses a few objects: the plain pickle then
                    fmt = "pickle"
                    data, suffix = self.encode(make(payload, lambda: np.zeros(2, np.float32)), fmt)
                path = self.write(data, suffix)
                name = getattr(payload.fn, "__qualname__", payload.fn)
                run = (lambda p=path: load_checkpoint(p)) if self.rng.random() < 0.5 else self.load_as_toy(path)
                self.add("hostile pickle", f"{name} in a {label} ({fmt})", run)

    def wrong_dtypes(self, n: int = 140) -> None:
        integer = [k for k, v in self.state.items() if not v.is_floating_point()]
        for _ in range(n):
            state = dict(self.state)
            if integer and self.rng.random() < 0.15:
                key = self.rng.choice(integer)
                state[key] = state[key].to(self.rng.choice([torch.float32, torch.float16, torch.bool]))
                what = f"{key} as {state[key].dtype}"
            else:
                key = self.rng.choice(self.floating)
                value = state[key]
                kind = self.rng.choice(["int64", "int32", "int8", "uint8", "bool", "complex", "relabel", "lossy64"])
                state[key] = {
                    "int64": lambda: (value * 1000).to(torch.int64), "int32": lambda: value.to(torch.int32),
                    "int8": lambda: value.to(torch.int8), "uint8": lambda: (value * 100).to(torch.uint8),
                    "bool": lambda: value > 0, "complex": lambda: value.to(torch.complex64),
                    "relabel": lambda: value.contiguous().view(torch.int32),
                    "lossy64": lambda: value.double() + 1e-12 * (torch.rand_like(value.double()) + 1),
                }[kind]()
                what = f"{key} as {kind}"
            fmt = self.rng.choice(["zip", "safetensors"])
            if state[key].dtype.is_complex:
                fmt = "zip"  # safetensors has no complex dtype
            data, suffix = self.encode(state, fmt)
            self.add("wrong dtype", f"{what} ({fmt})", self.load_as_toy(self.write(data, suffix)))

    def nonfinite(self, n: int = 120) -> None:
        for _ in range(n):
            state = dict(self.state)
            key = self.rng.choice(self.floating)
            value = state[key].clone()
            flat = value.view(-1)
            for _ in range(self.rng.randrange(1, 4)):
                flat[self.rng.randrange(flat.numel())] = self.rng.choice([float("nan"), float("inf"), float("-inf")])
            state[key] = value
            fmt = self.rng.choice(["zip", "safetensors", "legacy"])
            data, suffix = self.encode(state, fmt)
            self.add("non-finite", f"{key} ({fmt})", self.load_as_toy(self.write(data, suffix)))

    def folders(self, n: int = 160) -> None:
        base = zoo.save_pretrained(zoo.create_model(TOY), self.root / "base-folder")
        config = json.loads((base / "config.json").read_text())
        weights_bytes = (base / "model.safetensors").read_bytes()
        sizes = sorted(KWARG_LIMITS)

        def bad_kwargs() -> tuple[str, object]:
            kind = self.rng.randrange(9)
            key = self.rng.choice(sizes)
            if kind == 0:
                return "size over its bound", {key: KWARG_LIMITS[key] + self.rng.randrange(1, 10 ** 12)}
            if kind == 1:
                return "negative size", {key: -self.rng.randrange(1, 10 ** 6)}
            if kind == 2:
                return "size of another type", {key: self.rng.choice([1e11, 2.5, True, "10", [10], {"n": 1}, None]
                                                                      if key != "num_classes" else [1e11, 2.5, True, "10", [10]])}
            if kind == 3:
                return "unknown kwarg", {f"bogus_{self.rng.randrange(1000)}": self.rng.randrange(5)}
            if kind == 4:
                return "mistyped kwarg", self.rng.choice([{"rpa_interpolation": 7}, {"bug_compatible": "yes"},
                                                          {"rpa_kernel_size": "7"}, {"num_classes": "10"},
                                                          {"in_chans": 2.5}, {"global_pool": 3}])
            if kind == 5:
                nested: object = 1
                for _ in range(self.rng.randrange(5, 40)):
                    nested = [nested]
                return "deep nesting", {"num_classes": nested}
            if kind == 6:
                return "huge list", {"anchor": list(range(self.rng.randrange(65, 5000)))}
            if kind == 7:
                return "huge integer", {"x": 10 ** self.rng.randrange(7, 40)}
            return "huge string", {"global_pool": "x" * self.rng.randrange(1001, 100_000)}

        for i in range(n):
            folder = self.root / f"folder{i:04d}"
            folder.mkdir()
            (folder / "model.safetensors").write_bytes(weights_bytes)
            choice = self.rng.random()
            if choice < 0.75:
                what, kwargs = bad_kwargs()
                text = json.dumps({**config, "kwargs": kwargs})
            elif choice < 0.85:
                what = "not a config"
                text = self.rng.choice(["[1, 2]", '"text"', "42", "{not json", "\xff\xfe", "null", '{"model": 5}',
                                        '{"model": "rpa_cifar_toy", "kwargs": [1]}', '{"model": "no_such_model"}',
                                        '{"kwargs": {"num_classes": NaN}, "model": "rpa_cifar_toy"}'])
            else:
                what = "malformed pretrained_cfg"
                junk = self.rng.choice([{"label_names": 5}, {"reported": [{"bogus": 1}]}, {"reported": 3},
                                        {"preprocessing": {"mean": "x"}}, {"label_names": "no_such_set"},
                                        {"preprocessing": {"input_size": -1}}])
                text = json.dumps({**config, "pretrained_cfg": junk})
            (folder / "config.json").write_text(text, encoding="utf-8", errors="surrogateescape")
            # (create_model(TOY, weights=folder) reads a folder that names another model as plain weights: only
            # from_pretrained takes the model from config.json)
            run = (lambda f=folder: zoo.from_pretrained(f)) if i % 2 or what == "not a config" else (
                lambda f=folder: zoo.create_model(TOY, weights=str(f)))
            self.add("folder config", what, run)

    def conversions(self, n: int = 150) -> None:
        out = self.root / "never-written"

        def rsa_state(stage: int, block: int) -> dict:
            state = {"module.base_model.conv1.weight": torch.zeros(8, 3, 1, 7, 7), "module.new_fc.weight": torch.zeros(8, 256, 1)}
            for s in range(1, 5):
                state[f"module.base_model.layer{s}.0.conv1.weight"] = torch.zeros(8, 8, 1, 1, 1)
            state[f"module.base_model.layer{stage}.{block}.conv1.weight"] = torch.zeros(8, 8, 1, 1, 1)
            return {"state_dict": state}

        makers = [
            ("rsa", "rsanet_mini", "block index far away",
             lambda: rsa_state(self.rng.randrange(1, 5), self.rng.choice([2, 7, 10 ** 4, 99_999_999, 2 ** 40]))),
            ("rsa", "rsanet_mini", "zero-size shapes the hook divides by", lambda: {"state_dict": {
                "base_model.conv1.weight": torch.zeros(0, 3, 1, 7, 7),
                "base_model.layer1.0.conv2.H2.weight": torch.zeros(0, 1, 3, 5, 5),
                **{f"base_model.layer{s}.0.conv1.weight": torch.zeros(8, 8, 1, 1, 1) for s in range(1, 5)}}}),
            ("rsa", "rsanet_mini", "a layer without conv1", lambda: {"state_dict": {
                "base_model.layer1.0.conv2.H2.weight": torch.zeros(4, 1, 3, 5, 5),
                **{f"base_model.layer{s}.1.bn1.weight": torch.zeros(8) for s in range(1, 5)},
                **{f"base_model.layer{s}.0.bn1.weight": torch.zeros(8) for s in range(1, 5)}}}),
            ("rga", "rga_sc_mini", "class rows over the bound", lambda: {"state_dict": {
                "cls.weight": torch.zeros(1, 1).expand(self.rng.randrange(100_001, 10 ** 9), 256)}}),
            ("sasa-leader", "sasa_resnet26_cifar", "class rows over the bound", lambda: {"state_dict": {
                "module.dense.weight": torch.zeros(1, 1).expand(self.rng.randrange(100_001, 10 ** 9), 2048)}}),
            ("irpe-detr", "detr_irpe_mini", "hostile args", lambda: {"model": {"w": torch.zeros(1)}, "args": argparse.Namespace(
                **{self.rng.choice(["hidden_dim", "nheads", "enc_layers", "dec_layers", "dim_feedforward", "num_queries"]):
                   self.rng.choice([10 ** 9, -1, "8", 2.5, None, [1], float("nan")])})}),
            ("irpe-detr", "detr_irpe_mini", "odd args", lambda: {"model": {}, "args": self.rng.choice([
                "text", 5, ["a"], {"dataset_file": ["x"]}, argparse.Namespace(masks=True),
                argparse.Namespace(backbone="resnet18"), argparse.Namespace(backbone="resnet50_div0")])}),
        ]
        generic = [
            ("state_dict of another type", lambda: {"state_dict": self.rng.choice(["text", 5, [torch.zeros(1)], None, torch.zeros(3)])}),
            ("integer keys", lambda: {"state_dict": {1: torch.zeros(1), 2: torch.zeros(2)}}),
            ("no tensors", lambda: {"state_dict": {"a": 1, "b": "x"}, "epoch": 3}),
            ("a bare tensor", lambda: torch.zeros(3)),
            ("keys of another model", lambda: {"state_dict": {f"x{i}.weight": torch.zeros(2) for i in range(5)}}),
        ]
        targets = [("rga", "rga_sc_mini"), ("rsa", "rsanet_mini"), ("irpe-detr", "detr_irpe_mini"),
                   ("rpa-toy", TOY), ("sasa-leader", "sasa_resnet26_cifar")]
        for i in range(n):
            if i % 3:
                map_name, model_name, what, make = self.rng.choice(makers)
            else:
                what, make = self.rng.choice(generic)
                map_name, model_name = self.rng.choice(targets)
            buffer = io.BytesIO()
            torch.save(make(), buffer)
            path = self.write(buffer.getvalue(), ".pth.tar")
            self.add("conversion", f"{what} through {map_name}",
                     lambda p=path, m=map_name, t=model_name: convert_checkpoint(p, m, out, model_name=t))

    def sources(self, n: int = 70) -> None:
        for _ in range(n):
            kind = self.rng.randrange(7)
            junk = "".join(self.rng.choice("ab/:@[]%.-_\\ ~") for _ in range(self.rng.randrange(1, 30)))
            source = [
                lambda: "http://[" + junk, lambda: "hf://" + self.rng.choice(["", "org", "org/", "/repo", "org/../x",
                                                                              "org/repo@", "org/re po", "or g/repo"]),
                lambda: "x" * self.rng.randrange(256, 5000) + ".pth", lambda: "a\0" + junk,
                lambda: self.rng.choice(["ftp", "s3", "gs", "abc"]) + "://" + junk,
                lambda: os.fsdecode(bytes(self.rng.randrange(128, 256) for _ in range(12))) + ".pth",
                lambda: "hf://org/repo/" + self.rng.choice(["../x", "a//b", "./x", "x/.."]),
            ][kind]()
            run = (lambda s=source: weights.fetch(s)) if kind % 2 else (lambda s=source: zoo.create_model(TOY, weights=s))
            self.add("source", repr(source[:60]), run)

    def plain_pickles(self, n: int = 45) -> None:
        for _ in range(n):
            protocol = self.rng.choice([3, 4, 5])
            shape = tuple(self.rng.randrange(1, 5) for _ in range(self.rng.randrange(0, 3)))
            obj = {f"k{j}": np.zeros(shape, dtype=self.rng.choice([np.float32, np.float64, np.int64, np.uint8]))
                   for j in range(self.rng.randrange(1, 4))}
            if self.rng.random() < 0.3:
                obj, protocol = {"w": np.array([1, "a", None], dtype=object)}, 2
            path = self.write(pickle.dumps(obj, protocol=protocol), ".pkl")
            self.add("plain pickle", f"protocol {protocol}", self.load_as_toy(path))


def generate(root: Path) -> Fuzzer:
    fuzz = Fuzzer(root, random.Random(SEED))
    for family in (fuzz.truncated, fuzz.garbage, fuzz.lying_safetensors, fuzz.hostile_pickles, fuzz.wrong_dtypes,
                   fuzz.nonfinite, fuzz.folders, fuzz.conversions, fuzz.sources, fuzz.plain_pickles):
        family()
    return fuzz


# ---------------------------------------------------------------------------------------------
# The test
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_thousand_malformed_checkpoints_end_in_relzoo_errors(tmp_path, monkeypatch, one_torch_thread):
    monkeypatch.setenv("RELZOO_OFFLINE", "1")  # a source that happens to be valid must not go out to the network
    monkeypatch.setenv("RELZOO_NO_PROGRESS", "1")
    fuzz = generate(tmp_path)
    assert len(fuzz.cases) >= 1000, len(fuzz.cases)
    problems, families = [], {}
    started = time.monotonic()
    for index, case in enumerate(fuzz.cases):
        families[case.family] = families.get(case.family, 0) + 1
        begin = time.monotonic()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # torch's notes on pickle protocols and weights_only
                case.run()
        except ZooError:
            outcome = None
        except Exception as exc:  # anything else escaped a public path
            outcome = f"{type(exc).__name__}: {str(exc)[:200]}"
        else:
            outcome = "loaded silently"
        seconds = time.monotonic() - begin
        if seconds > PER_CASE_SECONDS:
            outcome = (outcome or "") + f" took {seconds:.1f} s"
        if outcome:
            problems.append(f"#{index} {case.family}: {case.name}: {outcome}")
    assert not fuzz.sentinel.exists() and fuzz.canary.is_dir(), "a pickled payload ran"
    assert not (tmp_path / "never-written").exists()
    print(f"{len(fuzz.cases)} cases in {time.monotonic() - started:.0f} s: {families}")
    assert not problems, f"{len(problems)} of {len(fuzz.cases)} cases:\n" + "\n".join(problems[:60])
