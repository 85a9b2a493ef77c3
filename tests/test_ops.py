"""Native-op loader (zoo/ops/build.py), the backend switch (zoo/ops/backend.py) and the iRPE
``rpe_index`` op (zoo/ops/rpe_index.py, kernel in ops/rpe_index/).

Builds are cached in ``$RELZOO_EXTENSIONS_DIR`` (tests/conftest.py points it at
~/.cache/relzoo/extensions), so only the tests that must see a first build
compile into fresh folders. Behaviour that depends on process-global state
(RELZOO_OPS modes, the once-only warning, loading a library) is checked in
subprocesses. The CUDA compile test is marked ``cuda_build`` (2-5 min on a cold
cache; deselect with ``-m "not cuda_build"``); tests on a GPU run only where one is.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import zoo.ops as ops
from conftest import native_op, subprocess_env
import zoo.paths
from zoo._fs import file_lock
from zoo.errors import OpsError
from zoo.ops.build import _cached_library, _recipe

loader = sys.modules["zoo.ops.build"]  # the module; ``zoo.ops.build`` is the function of that name

REPO_ROOT = Path(__file__).resolve().parents[1]
COMPILE_LINE = "RelZoo: compiling native op 'rpe_index'"
HAS_GPU = torch.cuda.is_available()

# The transposed (q/k) contextual iRPE fixture cases: input @ table -> rpe_index.
CTX_QK_CASES = [
    "irpe_cross_ctx_sh0_qk_r1.9_h5w7_skip0", "irpe_cross_ctx_sh1_qk_r1.9_h5w7_skip0",
    "irpe_euc_ctx_sh0_qk_r1.9_h5w7_skip0", "irpe_euc_ctx_sh1_qk_r1.9_h5w7_skip0",
    "irpe_euc_ctx_sh1_qk_r1.9_h5w7_skip1", "irpe_product_ctx_sh0_qk_r1.9_h5w7_skip0",
    "irpe_product_ctx_sh1_qk_r1.9_h4w4_skip1", "irpe_product_ctx_sh1_qk_r1.9_h5w7_skip0",
    "irpe_product_ctx_sh1_qk_r2.0_h6w9_skip0", "irpe_quant_ctx_sh0_qk_r2.5_h5w7_skip0",
    "irpe_quant_ctx_sh0_qk_r2.5_h5w7_skip2", "irpe_quant_ctx_sh1_qk_r2.5_h5w7_skip0",
]


# ----------------------------------------------------------------------------- helpers

def run_python(code: str, ext_dir: Path, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter with the repo importable and builds in ``ext_dir``."""
    full_env = subprocess_env(RELZOO_EXTENSIONS_DIR=str(ext_dir), RELZOO_OPS_CUDA="0")
    full_env.pop("RELZOO_OPS", None)
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=full_env, cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=timeout)


def last_json(proc: subprocess.CompletedProcess) -> dict:
    assert proc.returncode == 0, f"subprocess failed (rc {proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


LOAD_AND_CHECK = """
    import json, time, torch, zoo.ops as ops
    start = time.perf_counter()
    lib = ops.load("rpe_index")
    seconds = time.perf_counter() - start
    x = torch.randn(2, 3, 5, 7, dtype=torch.float64)
    index = torch.randint(0, 7, (5, 9))
    ok = torch.equal(torch.ops.relzoo.rpe_index(x, index), ops.rpe_index_reference(x, index))
    print(json.dumps({"library": str(lib), "seconds": seconds, "ok": ok}))
"""


def cpu_folder() -> str:
    """Cache folder name of the CPU-only build (what the subprocesses build)."""
    return _recipe("rpe_index", False, None).folder


@pytest.fixture(scope="session")
def cpu_build() -> Path:
    """A valid CPU-only build in the shared cache (built once), to copy into test folders."""
    return ops.build("rpe_index", cuda=False).parent


@pytest.fixture(scope="module")
def native():
    """The native op loaded into this process (with CUDA kernels where a GPU is present)."""
    return native_op("rpe_index")


def random_case(lead=(2, 3), Lq=6, Lk=9, nb=5, dtype=torch.float64, index_dtype=torch.int64, device="cpu", seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, Lq, nb, generator=gen, dtype=torch.float64).to(dtype).to(device)
    index = torch.randint(0, nb, (Lq, Lk), generator=gen).to(index_dtype).to(device)
    return x, index


def grads(fn, x, index, grad_out):
    x = x.detach().requires_grad_(True)
    y = fn(x, index)
    (gx,) = torch.autograd.grad(y, x, grad_out)
    return y.detach(), gx


# ----------------------------------------------------------------------------- loader

@pytest.mark.slow
def test_first_build_by_two_processes_at_once_over_a_broken_cache_then_cached_load(tmp_path, cpu_build):
    """The cache holds a corrupt build (truncated library), a crashed builder's private folder and
    its stale lock file. Two processes start loading together: one compiles (announced in one
    line), the other waits and loads the result; the debris is gone. Then a third process loads
    the cached library without compiling, in well under a second."""
    ext = tmp_path / "ext"
    ext.mkdir()
    built = ext / cpu_folder()
    shutil.copytree(cpu_build, built)
    library = next(built.glob("*.so"))
    library.write_bytes(library.read_bytes()[: library.stat().st_size // 2])
    leftover = ext / f"{cpu_folder()}.tmp-999999"
    leftover.mkdir()
    (leftover / "lock").write_text("")  # torch's lock file in the crashed build's folder
    (ext / f"{cpu_folder()}.lock").write_text(json.dumps({"pid": 999999, "host": "gone", "since": "long ago"}))

    barrier = tmp_path / "barrier"
    barrier.mkdir()
    racer = textwrap.dedent("""
        import os, time
        from pathlib import Path
        import torch, zoo.ops
        barrier = Path(os.environ["BARRIER"])  # start loading together
        (barrier / str(os.getpid())).touch()
        while len(list(barrier.iterdir())) < 2:
            time.sleep(0.05)
    """) + textwrap.dedent(LOAD_AND_CHECK)
    env = subprocess_env(RELZOO_EXTENSIONS_DIR=str(ext), RELZOO_OPS_CUDA="0", BARRIER=str(barrier))
    env.pop("RELZOO_OPS", None)
    procs = [subprocess.Popen([sys.executable, "-c", racer], env=env, cwd=REPO_ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=900)
        results.append(last_json(subprocess.CompletedProcess(proc.args, proc.returncode, out, err)))
        results[-1]["stderr"] = err
    stderr = "".join(r["stderr"] for r in results)
    assert all(r["ok"] for r in results)
    assert results[0]["library"] == results[1]["library"] == str(built / library.name)
    assert stderr.count(COMPILE_LINE) == 1, stderr             # exactly one build, announced in one line
    assert stderr.count("waiting for another process") == 1, stderr
    assert [p.name for p in ext.iterdir() if p.is_dir()] == [cpu_folder()]  # debris and private folders gone
    assert _cached_library(built) == built / library.name
    assert not (built / "lock").exists()                      # torch's lock file never lands in the cache
    manifest = json.loads((built / ops.MANIFEST).read_text())
    assert manifest["build_seconds"] > 0 and manifest["cuda"] is False

    ninja_file_mtime = (built / "build.ninja").stat().st_mtime_ns
    cached = run_python(LOAD_AND_CHECK, ext)
    result = last_json(cached)
    assert result["ok"] and COMPILE_LINE not in cached.stderr
    assert result["seconds"] < 1.0, f"cached load took {result['seconds']:.2f} s"
    assert (built / "build.ninja").stat().st_mtime_ns == ninja_file_mtime  # ninja was not run again


def test_stale_lock_files_do_not_block_a_cached_load(tmp_path, monkeypatch, capfd, cpu_build):
    """Lock files left by killed processes (ours, and torch's, on which torch 2.13 hangs) cost nothing."""
    ext = tmp_path / "ext"
    ext.mkdir()
    shutil.copytree(cpu_build, ext / cpu_folder())
    (ext / cpu_folder() / "lock").write_text("")
    (ext / f"{cpu_folder()}.lock").write_text(json.dumps({"pid": 999999, "host": "gone", "since": "long ago"}))
    monkeypatch.setenv("RELZOO_EXTENSIONS_DIR", str(ext))
    assert ops.build("rpe_index", cuda=False) == ext / cpu_folder() / "relzoo_rpe_index.so"
    assert COMPILE_LINE not in capfd.readouterr().err


def test_waiting_for_a_held_lock_times_out(tmp_path):
    """A live process holds the build lock: `auto` falls back to the reference with ONE warning;
    `native` gives up after the timeout with an error naming the holder."""
    ext = tmp_path / "ext"
    ext.mkdir()
    with file_lock(ext / f"{cpu_folder()}.lock", timeout=5, what="test"):
        proc = run_python("""
            import os, warnings, torch, zoo.ops as ops
            from zoo.errors import OpsError
            x, index = torch.randn(2, 4, 3), torch.randint(0, 3, (4, 6))
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                for _ in range(3):  # not retried: one wait, one warning
                    assert torch.equal(ops.rpe_index(x, index), ops.rpe_index_reference(x, index))
            print("warnings:", len(caught), caught[0].message)
            os.environ["RELZOO_OPS"] = "native"
            try:
                ops.rpe_index(x, index)
            except OpsError as exc:
                print("native error:", exc)
        """, ext, env={"RELZOO_OPS_LOCK_TIMEOUT": "1"})
    assert proc.returncode == 0, proc.stderr
    assert "warnings: 1 RelZoo: native op 'rpe_index' unavailable" in proc.stdout
    error = proc.stdout.split("native error:", 1)[1]
    assert "timed out after 1 s" in error and f"pid {os.getpid()}" in error
    assert not any(p.is_dir() for p in ext.iterdir())  # nobody built while the lock was held


def test_mode_reference_never_compiles(tmp_path):
    proc = run_python("""
        import torch, zoo.ops as ops
        from zoo.errors import OpsError
        assert ops.get_op("rpe_index") is None
        x, index = torch.randn(2, 4, 3, requires_grad=True), torch.randint(0, 3, (4, 6))
        ops.rpe_index(x, index).sum().backward()
        try:
            ops.load("rpe_index")
        except OpsError as exc:
            print("refused:", exc)
    """, tmp_path / "ext", env={"RELZOO_OPS": "reference"})
    assert proc.returncode == 0, proc.stderr
    assert "refused:" in proc.stdout and "RELZOO_OPS=reference" in proc.stdout
    assert COMPILE_LINE not in proc.stderr and not (tmp_path / "ext").exists()


def test_mode_auto_falls_back_once_when_the_compiler_is_missing(tmp_path):
    proc = run_python("""
        import warnings, torch, zoo.ops as ops
        x, index = torch.randn(2, 4, 3), torch.randint(0, 3, (4, 6))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(3):
                assert torch.equal(ops.rpe_index(x, index), ops.rpe_index_reference(x, index))
        print("warnings:", len(caught), caught[0].message)
    """, tmp_path / "ext", env={"CXX": str(tmp_path / "no-such-compiler")})
    assert proc.returncode == 0, proc.stderr
    assert "warnings: 1 RelZoo: native op 'rpe_index' unavailable" in proc.stdout
    assert "failed" in proc.stdout


def test_mode_native_raises_instead_of_falling_back(monkeypatch):
    monkeypatch.setattr(loader, "_FAILED", {})
    monkeypatch.setenv("RELZOO_OPS", "native")
    with pytest.raises(OpsError, match="unknown native op 'no_such_op'"):
        ops.get_op("no_such_op")
    monkeypatch.setenv("RELZOO_OPS", "auto")
    with pytest.warns(RuntimeWarning, match="native op 'no_such_op' unavailable"):
        assert ops.get_op("no_such_op") is None
    assert ops.get_op("no_such_op") is None  # remembered: no second warning, no second attempt


def test_unknown_mode_and_unknown_op(monkeypatch):
    monkeypatch.setenv("RELZOO_OPS", "fast")
    with pytest.raises(ValueError, match="RELZOO_OPS='fast'"):
        ops.mode()
    monkeypatch.setenv("RELZOO_OPS", "auto")
    with pytest.raises(OpsError, match="unknown native op 'no_such_op'"):
        ops.build("no_such_op")


def test_compiler_errors_are_shown_with_a_hint(tmp_path, monkeypatch):
    monkeypatch.setenv("RELZOO_EXTENSIONS_DIR", str(tmp_path / "ext"))
    source = tmp_path / "broken_op"
    source.mkdir()
    (source / "broken_op.cpp").write_text('#error "deliberately broken for the relzoo test"\n')
    with pytest.raises(OpsError) as info:
        ops.build("broken_op", cuda=False, source_dir=source)
    message = str(info.value)
    assert "deliberately broken for the relzoo test" in message and "broken_op.cpp" in message
    assert "hint:" in message
    assert not [p for p in (tmp_path / "ext").iterdir() if p.is_dir()]  # nothing half-built left in the cache


def test_a_build_past_its_timeout_is_stopped(tmp_path, monkeypatch):
    monkeypatch.setenv("RELZOO_EXTENSIONS_DIR", str(tmp_path / "ext"))
    monkeypatch.setenv("RELZOO_OPS_BUILD_TIMEOUT", "0.5")  # less than the compiler child needs to start
    with pytest.raises(OpsError, match="took longer than 0.5 s and was stopped"):
        ops.build("rpe_index", cuda=False)
    assert not [p for p in (tmp_path / "ext").iterdir() if p.is_dir()]


def test_cuda_toolkit_behind_a_wrapper_script_is_resolved(tmp_path, monkeypatch):
    toolkit = tmp_path / "cuda-99.0"
    (toolkit / "bin").mkdir(parents=True)
    (toolkit / "include").mkdir()
    (toolkit / "include" / "cuda_runtime.h").write_text("")
    (toolkit / "bin" / "nvcc").write_bytes(b"\x7fELF fake binary")
    wrapper_dir = tmp_path / "wrappers"
    wrapper_dir.mkdir()
    wrapper = wrapper_dir / "nvcc"
    wrapper.write_text(f'#!/bin/sh\nexec {toolkit}/bin/nvcc "$@"\n')
    wrapper.chmod(0o755)
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.delenv("CUDA_PATH", raising=False)
    monkeypatch.setenv("PATH", f"{wrapper_dir}{os.pathsep}{os.environ['PATH']}")
    assert ops.cuda_toolkit_home() == toolkit


CUDA_OPS = sorted(p.name for p in zoo.paths.ops_dir().iterdir() if any(p.glob("*.cu")))


@pytest.mark.cuda_build
@pytest.mark.parametrize("name", CUDA_OPS)
def test_cuda_sources_compile_without_a_gpu(tmp_path, name):
    """Every op's .cu kernels compile through the same loader (no GPU needed) and register CUDA
    kernels for ``relzoo::<name>`` and its backward."""
    # RELZOO_REQUIRE_CUDA_BUILD=1 (CI) turns a missing toolchain into a failure instead of a skip.
    missing = pytest.fail if os.environ.get("RELZOO_REQUIRE_CUDA_BUILD") == "1" else pytest.skip
    if torch.version.cuda is None:
        missing(f"torch {torch.__version__} has no CUDA support, so .cu sources cannot be compiled")
    if ops.cuda_toolkit_home() is None:
        missing("no CUDA toolkit (nvcc) found: set CUDA_HOME or put nvcc on PATH")
    library = ops.build(name, cuda=True)
    proc = run_python(f"""
        import torch
        torch.ops.load_library({str(library)!r})
        print(torch._C._dispatch_has_kernel_for_dispatch_key("relzoo::{name}", "CUDA"),
              torch._C._dispatch_has_kernel_for_dispatch_key("relzoo::{name}_backward", "CUDA"))
    """, tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["True", "True"]


# ----------------------------------------------------------------------------- rpe_index: values

@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape", [((2, 3), 6, 9, 5), ((4,), 7, 7, 1), ((), 5, 11, 13), ((2, 8), 40, 40, 81)])
def test_native_equals_reference_bitwise(native, shape, dtype, index_dtype):
    lead, Lq, Lk, nb = shape
    x, index = random_case(lead, Lq, Lk, nb, dtype, index_dtype, seed=Lq * nb)
    grad_out = torch.randn(*lead, Lq, Lk, dtype=torch.float64).to(dtype)
    y_native, gx_native = grads(native.rpe_index, x, index, grad_out)
    y_ref, gx_ref = grads(ops.rpe_index_reference, x, index, grad_out)
    assert torch.equal(y_native, y_ref)
    assert torch.equal(gx_native, gx_ref)  # same additions in the same order


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision(native, dtype):
    x, index = random_case((2, 3), 12, 30, 4, dtype)
    grad_out = torch.randn(2, 3, 12, 30).to(dtype)
    y_native, gx_native = grads(native.rpe_index, x, index, grad_out)
    y_ref, _ = grads(ops.rpe_index_reference, x, index, grad_out)
    _, gx_exact = grads(ops.rpe_index_reference, x.double(), index, grad_out.double())
    assert y_native.dtype == dtype and torch.equal(y_native, y_ref)  # a gather is exact
    # float accumulation, one rounding at the end: at most half an ulp away from the exact sum
    assert torch.allclose(gx_native.double(), gx_exact, rtol=2 ** -7, atol=0)


@pytest.mark.parametrize("case", CTX_QK_CASES)
def test_fixture_cases(native, case):
    """iRPE contextual q/k modules of the original: (input @ table) gathered by rp_bucket,
    through the native op and the reference, against the fixture's output and gradients."""
    from conftest import load_case

    meta, t = load_case("irpe", case)
    tol = meta["tolerance"]["output"]
    parts = ([("rp_rows.", t["rp_bucket_rows"]), ("rp_cols.", t["rp_bucket_cols"])] if "rp_bucket_rows" in t
             else [("", t["rp_bucket"])])
    results = {}
    for name, fn in (("native", native.rpe_index), ("reference", ops.rpe_index_reference)):
        x = t["input"].clone().requires_grad_(True)
        tables = [t[f"param.{prefix}lookup_table_weight"].clone().requires_grad_(True) for prefix, _ in parts]
        out = sum(fn(torch.matmul(x, w), bucket) for w, (_, bucket) in zip(tables, parts))
        out.backward(t["grad_output"])
        results[name] = (out.detach(), x.grad, [w.grad for w in tables])
    (out_n, gx_n, gw_n), (out_r, gx_r, gw_r) = results["native"], results["reference"]
    assert torch.equal(out_n, out_r) and torch.equal(gx_n, gx_r)
    assert all(torch.equal(a, b) for a, b in zip(gw_n, gw_r))
    torch.testing.assert_close(out_n, t["output"], atol=tol["atol"], rtol=tol["rtol"])
    torch.testing.assert_close(gx_n, t["grad_input"], atol=tol["atol"], rtol=tol["rtol"])
    for (prefix, _), gw in zip(parts, gw_n):
        torch.testing.assert_close(gw, t[f"grad_param.{prefix}lookup_table_weight"], atol=tol["atol"], rtol=tol["rtol"])


def test_non_contiguous_inputs(native):
    base, index_base = random_case((3, 2), 8, 10, 6, torch.float64, torch.int32)
    x = base.transpose(0, 1)                                            # (2, 3, 8, 6), non-contiguous
    index = index_base.repeat(1, 2)[:, ::2]                              # (8, 10), strided
    grad_out = torch.randn(10, 8, 3, 2, dtype=torch.float64).permute(3, 2, 1, 0)  # (2, 3, 8, 10)
    assert not (x.is_contiguous() or index.is_contiguous() or grad_out.is_contiguous())
    y, gx = grads(ops.rpe_index, x, index, grad_out)
    y_ref, gx_ref = grads(ops.rpe_index_reference, x.contiguous(), index.contiguous(), grad_out.contiguous())
    assert torch.equal(y, y_ref) and torch.equal(gx, gx_ref)


def test_empty_inputs(native):
    for lead, Lq, Lk, nb in [((0, 3), 4, 5, 2), ((2,), 0, 5, 2), ((2,), 4, 0, 2)]:
        x, index = random_case(lead, Lq, Lk, nb)
        y, gx = grads(native.rpe_index, x, index, torch.ones(*lead, Lq, Lk, dtype=torch.float64))
        assert y.shape == (*lead, Lq, Lk) and gx.shape == x.shape and not gx.any()


def test_backend_argument_chooses_the_path(native, monkeypatch):
    """``backend`` overrides RELZOO_OPS's "auto"; "native" never falls back silently."""
    x, index = random_case()
    assert ops.use_native("rpe_index", "native", "cpu") and ops.use_native("rpe_index", "auto", "cpu")
    assert not ops.use_native("rpe_index", "reference", "cpu")
    if not HAS_GPU:  # the build has no CUDA kernels
        with pytest.raises(OpsError, match="no kernel for device type 'cuda'"):
            ops.use_native("rpe_index", "native", "cuda")
    monkeypatch.setenv("RELZOO_OPS", "reference")
    assert not ops.use_native("rpe_index", "auto", "cpu")
    assert torch.equal(ops.rpe_index(x, index), ops.rpe_index_reference(x, index))
    with pytest.raises(OpsError, match="RELZOO_OPS=reference"):
        ops.rpe_index(x, index, backend="native")


def test_gradcheck_and_gradgradcheck(native):
    x, index = random_case((2, 2), 5, 7, 4, torch.float64, torch.int32)
    x.requires_grad_(True)
    assert torch.autograd.gradcheck(ops.rpe_index, (x, index))
    assert torch.autograd.gradgradcheck(ops.rpe_index, (x, index))


def test_opcheck_and_torch_compile(native):
    """Schema, fake kernels and autograd registration agree (torch.library.opcheck);
    the public function traces into one graph."""
    x, index = random_case((2, 3), 5, 7, 4, torch.float64, torch.int32)
    x.requires_grad_(True)
    grad_out = torch.randn(2, 3, 5, 7, dtype=torch.float64, requires_grad=True)
    checks = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
    torch.library.opcheck(native.rpe_index.default, (x, index), test_utils=checks)
    torch.library.opcheck(native.rpe_index_backward.default, (grad_out, index, 4), test_utils=checks)

    def f(x, index):
        return (ops.rpe_index(x, index) * 2).sum()

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    (g_compiled,) = torch.autograd.grad(compiled(x, index), x)
    (g_eager,) = torch.autograd.grad(f(x, index), x)
    assert torch.equal(g_compiled, g_eager)


# ----------------------------------------------------------------------------- rpe_index: bad input

def test_errors_name_the_problem(native):
    x, index = random_case((2, 3), 6, 9, 5)
    with pytest.raises(TypeError, match="x must be float64, float32, bfloat16 or float16, got torch.int64"):
        ops.rpe_index(x.long(), index)
    with pytest.raises(TypeError, match="index must be int32 or int64 bucket ids, got torch.float32"):
        ops.rpe_index(x, index.float())
    with pytest.raises(ValueError, match=r"x has Lq = 6 rows .* index has 7"):
        ops.rpe_index(x, torch.zeros(7, 9, dtype=torch.long))
    with pytest.raises(ValueError, match=r"index must have shape \(Lq, Lk\), got \(6, 9, 1\)"):
        ops.rpe_index(x, index[..., None])
    with pytest.raises(ValueError, match=r"x must have shape \(\.\.\., Lq, num_buckets\), got \(5,\)"):
        ops.rpe_index(x[0, 0, 0], index)
    with pytest.raises(ValueError, match="x is on cpu but index is on meta"):
        ops.rpe_index(x, index.to("meta"))
    with pytest.raises(TypeError, match="expects tensors"):
        ops.rpe_index(x, [[0]])
    bad = index.clone()
    bad[3, 4] = 5
    with pytest.raises(RuntimeError, match=r"bucket id 5 .* outside \[0, 5\)"):
        native.rpe_index(x, bad)  # the kernel itself refuses out-of-range ids
    with pytest.raises(RuntimeError, match="index must be int32 or int64"):
        native.rpe_index(x, index.to(torch.int16))


# ----------------------------------------------------------------------------- rpe_index on a GPU

gpu = pytest.mark.skipif(not HAS_GPU, reason="no CUDA GPU visible")


@gpu
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_cuda_equals_cpu_reference_bitwise(native, dtype, index_dtype):
    x, index = random_case((2, 8), 850 // 5, 850 // 5, 81, dtype, index_dtype, seed=1)
    grad_out = torch.randn(2, 8, 170, 170, dtype=torch.float64).to(dtype)
    y_ref, gx_ref = grads(ops.rpe_index_reference, x, index, grad_out)
    y, gx = grads(ops.rpe_index, x.cuda(), index.cuda(), grad_out.cuda())
    assert torch.equal(y.cpu(), y_ref) and torch.equal(gx.cpu(), gx_ref)
    _, gx_again = grads(ops.rpe_index, x.cuda(), index.cuda(), grad_out.cuda())
    assert torch.equal(gx, gx_again)  # deterministic: no atomics


@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_low_precision(native, dtype):
    x, index = random_case((2, 3), 12, 30, 4, dtype)
    grad_out = torch.randn(2, 3, 12, 30).to(dtype)
    y, gx = grads(ops.rpe_index, x.cuda(), index.cuda(), grad_out.cuda())
    y_cpu, gx_cpu = grads(native.rpe_index, x, index, grad_out)
    assert torch.equal(y.cpu(), y_cpu) and torch.equal(gx.cpu(), gx_cpu)


@gpu
def test_cuda_many_buckets_and_non_contiguous(native):
    # nb too large for shared-memory accumulators: the global-workspace path
    x, index = random_case((2,), 6, 300, 9000, torch.float64, torch.int32, seed=3)
    grad_out = torch.randn(2, 6, 300, dtype=torch.float64)
    y_ref, gx_ref = grads(ops.rpe_index_reference, x, index, grad_out)
    y, gx = grads(ops.rpe_index, x.cuda(), index.cuda(), grad_out.cuda())
    assert torch.equal(y.cpu(), y_ref) and torch.equal(gx.cpu(), gx_ref)
    xt = x.cuda().transpose(0, 1).contiguous().transpose(0, 1)
    assert not xt.is_contiguous()
    assert torch.equal(ops.rpe_index(xt, index.cuda()).cpu(), y_ref)


@gpu
def test_cuda_gradcheck_and_stream(native):
    x, index = random_case((2, 2), 5, 7, 4, torch.float64, torch.int32, device="cuda")
    x.requires_grad_(True)
    assert torch.autograd.gradcheck(ops.rpe_index, (x, index))
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        y = ops.rpe_index(x.detach(), index)
    stream.synchronize()
    assert torch.equal(y, ops.rpe_index_reference(x.detach(), index))
