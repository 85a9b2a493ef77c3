"""Every attention layer on every backend, against PyTorch's fused attention (SDPA) of the same shape.

    python benchmarks/attention.py                        # CPU, the issue's sizes, every table
    python benchmarks/attention.py --quick                # small sizes, a fast look
    python benchmarks/attention.py --tables irpe_k rpa    # some tables only
    python benchmarks/attention.py --device cuda          # on a GPU (benchmarks/gpu.sh runs this)

One table per layer (``--tables``): ours on every backend (``auto`` names what it chose), today's
formulation (the explicit one this repository used before the fused paths), the original's
formulation, and SDPA of the same shape with the same input/output projections (the limit:
attention without relative terms on a fused kernel); inference and forward + backward.

* ``detr_plain``  RPEMultiheadAttention without RPE at the DETR-R50 encoder size (batch 2, 25x34 tokens,
  d_model 256, 8 heads); ``irpe_k`` / ``irpe_qkv`` the same with ``rpe-2.0-product-ctx-1-k`` / ``-qkv``.
* ``deit``        RPEAttention of DeiT-S (384 wide, 6 heads, 14x14 + cls, ``ctx_product_50_shared_k``) and plain.
* ``rpa``         MultiheadNonlocal2d relative_position (slerp, k 5), 64 channels, 2 heads, 32x32, and its
  plain block (``rpa_mode=None``).
* ``sasa``        SASAttention2d 64 -> 128 channels, 56x56, k 7, 8 heads: native kernel, FlexAttention, unfold.
* ``rpa_ops``     the RPA drop-in ops on an 8x8 map: ours vs the original op's algorithm (C++ loops, compiled
  by benchmarks/rpa.py), forward and an 8x8 gradcheck.
* ``sweep``       what ``backend="auto"`` picks per shape and dtype: relative_attention alone on its two candidate
  paths (CPU: native vs SDPA + bias; CUDA: FlexAttention vs SDPA + bias), 4x4 to 25x34 grids, float32/16, bfloat16.
* ``models``      whole models, images/s: today's formulation vs the new default (DETR-R50 + iRPE at 800x1216,
  RGA-SC R50 at 256x128, RSANet-R50 at 224, SASA-ResNet26 at 224; sizes and batches are options).

Timing: every row of a table takes its turn within each round (interleaved), the table shows the median
over ``--runs`` rounds after one warm-up (FlexAttention compiles during it), and +-half the spread
(max - min) / median of each row's samples. ``--clock thread`` measures the CPU time of one compute
thread instead of wall time: on a shared machine other processes then stretch no row. Attention
modules run with dropout 0 (the fused kernels' cost without a mask draw; CPU SDPA has no fused kernel
with dropout), in training mode for fwd+bwd. On CUDA every timed call ends with a synchronize.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import importlib.util
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from a plain checkout
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from zoo.layers.irpe import RPEAttention, RPEMultiheadAttention, get_rpe_config, iRPE, rpe_config_from_spec  # noqa: E402
from zoo.layers.rpa import MultiheadNonlocal2d, relative_attend_query2d, relative_attend_weight2d  # noqa: E402
from zoo.layers.sasa import SASAttention2d  # noqa: E402
from zoo.ops import relative_attn  # noqa: E402

ATTENTION_ROWS = ("auto", "native", "sdpa", "flex")


# ----------------------------------------------------------------------------- timing

class Timer:
    """Wall time, or with ``clock="thread"`` (one CPU thread) the CPU time of this thread, which a shared
    machine's other processes do not inflate (they still evict caches)."""

    def __init__(self, device: torch.device, runs: int, clock: str = "wall"):
        self.device, self.runs, self.clock = device, runs, clock
        self.now = time.thread_time if clock == "thread" else time.perf_counter

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def interleaved(self, fns: dict, warmup: bool = True) -> dict:
        """{name: (median seconds, spread)} of each fn(), taking turns within each round (after one warm-up
        call each, unless ``warmup`` is False: :func:`runnable` made it)."""
        for fn in fns.values() if warmup else ():
            fn()
            self.sync()
        samples = {name: [] for name in fns}
        for _ in range(self.runs):
            for name, fn in fns.items():
                start = self.now()
                fn()
                self.sync()
                samples[name].append(self.now() - start)
        return {name: (statistics.median(v), (max(v) - min(v)) / statistics.median(v)) for name, v in samples.items()}


def _ms(seconds) -> str:
    return "n/a" if seconds is None else f"{seconds * 1e3:.1f}"


def _ratio(seconds, base) -> str:
    return "n/a" if seconds is None or base is None else f"{seconds / base:.2f}x"


def print_table(title: str, rows: list, infer: dict, train: dict, base: str, note: str = "") -> None:
    """rows: (key, label); infer/train: key -> (median, spread) or missing (n/a)."""
    b_inf = infer.get(base, (None,))[0]
    b_tr = train.get(base, (None,))[0]
    print(f"\n{title}\n")
    print("| variant | inference ms | vs SDPA | fwd+bwd ms | vs SDPA |\n|---|---:|---:|---:|---:|")
    for key, label in rows:
        i, t = infer.get(key), train.get(key)
        i_s = f"{_ms(i[0])} (±{i[1] * 50:.0f}%)" if i else "n/a"
        t_s = f"{_ms(t[0])} (±{t[1] * 50:.0f}%)" if t else "n/a"
        print(f"| {label} | {i_s} | {_ratio(i[0] if i else None, b_inf)} | {t_s} | "
              f"{_ratio(t[0] if t else None, b_tr)} |")
    if note:
        print(f"\n{note}")


def runnable(fns: dict, what: str) -> dict:
    """The fns that run, each called once (so also warmed up); the others are reported as n/a with the
    reason (e.g. ``flex`` with a value term, ``native`` on CUDA)."""
    ok = {}
    for name, fn in fns.items():
        try:
            fn()
            ok[name] = fn
        except Exception as exc:
            print(f"[{what}: {name} n/a: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}]")
    return ok


# ----------------------------------------------------------------------------- attention layers

def _variant(module: nn.Module, attention_backend: str, index_backend: str = "auto") -> nn.Module:
    """A copy of ``module`` (same weights) on ``attention_backend``, its iRPE modules on ``index_backend``."""
    module = copy.deepcopy(module)
    for m in module.modules():
        if isinstance(m, iRPE):
            m.backend = index_backend
        elif isinstance(m, (RPEMultiheadAttention, RPEAttention, MultiheadNonlocal2d)):
            m.backend = attention_backend
    return module


class MHALimit(nn.Module):
    """The same input/output projections as an RPEMultiheadAttention, around SDPA: the limit."""

    def __init__(self, attn: RPEMultiheadAttention):
        super().__init__()
        self.attn = attn

    def forward(self, x):
        a = self.attn
        L, N, E = x.shape
        q, k, v = (t.reshape(L, N, a.num_heads, a.head_dim).permute(1, 2, 0, 3) for t in a._project(x, x, x))
        out = F.scaled_dot_product_attention(q, k, v)
        return a.out_proj(out.permute(2, 0, 1, 3).reshape(L, N, E))


class DeiTLimit(nn.Module):
    """DeiT's qkv and proj around SDPA."""

    def __init__(self, attn: RPEAttention):
        super().__init__()
        self.attn = attn

    def forward(self, x):
        a = self.attn
        B, N, C = x.shape
        q, k, v = a.qkv(x).reshape(B, N, 3, a.num_heads, C // a.num_heads).permute(2, 0, 3, 1, 4)
        return a.proj(F.scaled_dot_product_attention(q, k, v, scale=a.scale).transpose(1, 2).reshape(B, N, C))


def _chosen(module: nn.Module, call) -> str:
    """Which backend "auto" picks for this module's attention (what relative_attention is called with)."""
    seen = []
    real = relative_attn.choose_backend

    def spy(*args, **kwargs):
        choice = real(*args, **kwargs)
        seen.append(choice)
        return choice

    relative_attn.choose_backend = spy
    try:
        with torch.no_grad():
            call(module)
    finally:
        relative_attn.choose_backend = real
    return seen[0] if seen else "?"


def attention_table(title, module, limit, make_input, call, timer, device, flex: bool, note: str = "",
                    irpe: bool = False):
    """Rows: ours on each backend, today's and the original's formulation, the SDPA limit."""
    module = module.to(device)
    x = make_input().to(device)
    variants = {name: _variant(module, name) for name in ATTENTION_ROWS if name != "flex" or flex}
    variants["today"] = _variant(module, "reference")                          # explicit logits, fast index step
    if irpe:
        variants["original"] = _variant(module, "reference", "reference")      # ... and the original's gathers
    variants["limit"] = limit(variants["today"]).to(device)
    auto_choice = _chosen(variants["auto"], lambda m: call(m, x))
    rows = [("auto", f"ours, `auto` (chose `{auto_choice}`)")]
    rows += [(n, f"ours, `{n}`") for n in ATTENTION_ROWS[1:] if n in variants]
    rows += [("today", "today's formulation (`reference`: explicit logits"
                       + (", fast index step)" if irpe else ")")),
             *([("original", "the original's formulation (explicit logits, torch.gather / per-pair value table)")]
               if irpe else []),
             ("limit", "SDPA, same shape and projections, no relative terms (the limit)")]

    def infer_fn(m):
        def run():
            with torch.inference_mode():
                call(m, x)
        return run

    for m in variants.values():
        m.eval()
    infer_t = timer.interleaved(runnable({name: infer_fn(m) for name, m in variants.items()}, f"{title}: inference"),
                                warmup=False)

    xg = x.clone().requires_grad_(True)

    def train_fn(m):
        def run():
            xg.grad = None
            for p in m.parameters():
                p.grad = None
            call(m, xg).sum().backward()
        return run

    for m in variants.values():
        m.train()
    train = {name: train_fn(m) for name, m in variants.items()
             if not (name == "flex" and device.type == "cpu")}  # FlexAttention has no CPU backward
    train_t = timer.interleaved(runnable(train, f"{title}: fwd+bwd"), warmup=False)
    print_table(title, rows, infer_t, train_t, "limit", note)
    return infer_t, train_t


def mha(spec: str, batch: int, h: int, w: int, d_model: int = 256, heads: int = 8):
    torch.manual_seed(0)
    module = RPEMultiheadAttention(d_model, heads, dropout=0.0, rpe_config=rpe_config_from_spec(spec))
    with torch.no_grad():  # non-zero tables (DETR's xavier init makes them non-zero too)
        for name, p in module.named_parameters():
            if "rpe" in name:
                p.normal_(0, 0.05)
    make_input = lambda: torch.randn(h * w, batch, d_model)  # noqa: E731

    def call(m, x):
        if isinstance(m, MHALimit):
            return m(x)
        return m(x, x, x, need_weights=False, hw=(h, w))[0]

    return module, MHALimit, make_input, call


def deit(spec: bool, batch: int, side: int = 14, dim: int = 384, heads: int = 6):
    torch.manual_seed(0)
    config = get_rpe_config(1.9, "product", "ctx", True, 1, "k") if spec else None
    module = RPEAttention(dim, heads, qkv_bias=True, rpe_config=config)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "rpe" in name:
                p.normal_(0, 0.05)
    return module, DeiTLimit, (lambda: torch.randn(batch, 1 + side * side, dim)), (lambda m, x: m(x))


# ----------------------------------------------------------------------------- RPA, SASA

def rpa_table(args, timer, device):
    torch.manual_seed(0)
    size = (16, 16) if args.quick else (32, 32)
    ours = MultiheadNonlocal2d(64, num_heads=2, rpa_mode="relative_position", rpa_kernel_size=5,
                               rpa_interpolation="slerp", rpa_zero_init=False).to(device)
    plain = MultiheadNonlocal2d(64, num_heads=2).to(device)
    plain.load_state_dict({k: v for k, v in ours.state_dict().items() if not k.startswith(("a_k", "a_v"))})
    x = torch.randn(2, 64, *size, device=device)
    variants = {name: _variant(ours, name) for name in ("auto", "native", "sdpa", "reference")}
    variants["plain"] = _variant(plain, "auto")
    variants["plain_reference"] = _variant(plain, "reference")
    auto_choice = _chosen(variants["auto"], lambda m: m(x))
    rows = [("auto", f"ours, `auto` (chose `{auto_choice}`)"), ("native", "ours, `native`"),
            ("sdpa", "ours, `sdpa` (explicit: the value term needs the probabilities)"),
            ("reference", "the original's formulation (`reference`: per head, tables expanded, index gathers; its own 3 rounds)"),
            ("plain", "plain block (`rpa_mode=None`), `auto` = SDPA"),
            ("plain_reference", "plain block, explicit softmax (`reference`)")]
    infer = runnable({n: (lambda m=m: _no_grad(m, x)) for n, m in variants.items()}, "rpa inference")
    xg = x.clone().requires_grad_(True)
    train = runnable({n: (lambda m=m: m(xg).sum().backward()) for n, m in variants.items()}, "rpa fwd+bwd")
    # the original's formulation takes 50-80x as long (a minute a round at 32x32 on 2 cores): its own
    # three rounds, after the others' interleaved ones; its ratio needs no more precision than that
    slow = Timer(device, min(3, timer.runs), timer.clock)
    infer_t, train_t = ({**timer.interleaved({n: f for n, f in fns.items() if n != "reference"}, warmup=False),
                         **slow.interleaved({n: f for n, f in fns.items() if n == "reference"}, warmup=False)}
                        for fns in (infer, train))
    title = (f"MultiheadNonlocal2d(64, num_heads=2, relative_position, slerp, k 5), input 2x64x{size[0]}x{size[1]} "
             f"(the SDPA column: the plain block on SDPA)")
    ratio = train_t["auto"][0] / train_t["plain"][0]
    print_table(title, rows, infer_t, train_t, "plain",
                f"Goal: relative_position block <= 1.5x its plain block, fwd+bwd: **{ratio:.2f}x**.")


def _no_grad(m, x):
    with torch.inference_mode():
        return m(x)


def sasa_table(args, timer, device, flex: bool):
    torch.manual_seed(0)
    size = 28 if args.quick else 56
    layer = SASAttention2d(64, 128, kernel_size=7, heads=8).to(device)
    x = torch.randn(2, 64, size, size, device=device)
    backends = ["native", *(["flex"] if flex else []), "reference"]
    infer_t = timer.interleaved(runnable({b: (lambda b=b: _no_grad(lambda t: layer(t, backend=b), x))
                                          for b in backends}, "sasa inference"), warmup=False)
    xg = x.clone().requires_grad_(True)
    train = {b: (lambda b=b: layer(xg, backend=b).sum().backward()) for b in backends
             if b in infer_t and not (b == "flex" and device.type == "cpu")}
    if args.quick is False and device.type == "cpu":
        train.pop("reference", None)  # 8 s a step on 2 cores; its inference row shows the gap
    train_t = timer.interleaved(runnable(train, "sasa fwd+bwd"), warmup=False)
    auto = "flex" if device.type == "cuda" and "flex" in infer_t and relative_attn.flex_available(device) else "native"
    rows = [(b, f"`{b}`" + (" (what `auto` picks here)" if b == auto else "")) for b in backends]
    print_table(f"SASAttention2d(64, 128, kernel_size=7, heads=8), input 2x64x{size}x{size} (vs SDPA column: vs the "
                f"native kernel)", rows, infer_t, train_t, "native",
                "Goal (GPU): FlexAttention at k=7, 56x56 no slower than the native op's CUDA kernel.")


# ----------------------------------------------------------------------------- what auto picks, per shape

SWEEP_SHAPES = ((1, 4, 4, 64, 2), (2, 7, 7, 192, 3), (2, 8, 8, 192, 3), (2, 12, 12, 384, 6), (2, 14, 14, 384, 6),
                (2, 25, 34, 256, 8), (32, 7, 7, 192, 3), (8, 14, 14, 384, 6))  # (batch, h, w, d_model, heads)
SWEEP_TERMS = (("plain", ""), ("k", "rpe-2.0-product-ctx-1-k"), ("bias qk", "rpe-1.9-euc-bias-0-qk"),
               ("qkv", "rpe-2.0-product-ctx-1-qkv"))


def _sweep_problem(spec: str, batch: int, h: int, w: int, d_model: int, heads: int, dtype, device):
    """q, k, v (B, heads, L, d) and the iRPE terms of ``spec`` as relative_attention takes them."""
    torch.manual_seed(0)
    module = RPEMultiheadAttention(d_model, heads, rpe_config=rpe_config_from_spec(spec) if spec else None)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "rpe" in name:
                p.normal_(0, 0.05)
    module = module.to(device, dtype)
    L, d = h * w, d_model // heads
    x = torch.randn(L, batch, d_model, device=device, dtype=dtype)
    with torch.no_grad():
        q, k, v = (t.reshape(L, batch, heads, d).permute(1, 2, 0, 3).contiguous() for t in module._project(x, x, x))
        q = q * d ** -0.5
        terms = {}
        for name, rpe, inp in (("query_term", module.rpe_k, q), ("key_term", module.rpe_q, k * d ** -0.5),
                               ("value_term", module.rpe_v, None)):
            if rpe is not None:
                terms[name] = relative_attn.Term(rpe.per_bucket(inp).contiguous(), rpe.pair_taps(L, h, w, device))
    return (q, k, v), terms


def sweep_table(args, timer, device):
    """relative_attention itself (no projections) on the two candidate paths of ``auto`` per shape and dtype:
    the rule of zoo.ops.relative_attn.choose_backend, measured."""
    candidates = ("native", "sdpa") if device.type == "cpu" else ("flex", "sdpa")
    cases = [(shape, label, spec, torch.float32) for shape in SWEEP_SHAPES for label, spec in SWEEP_TERMS]
    cases += [(shape, label, spec, dtype) for dtype in (torch.bfloat16, torch.float16)
              for shape in SWEEP_SHAPES[1:6:2] for label, spec in SWEEP_TERMS[:2]]
    if args.quick:
        cases = [c for c in cases if c[0][1] * c[0][2] <= 196]
    print(f"\nWhat `auto` picks, per shape and dtype: relative_attention alone, `{candidates[0]}` vs `sdpa` "
          f"(ms, median of {timer.runs}; **bold**: the faster; the pick is marked ✓ when it is the faster or "
          f"within 10 %)\n")
    print(f"| batch, grid, heads x d | terms | dtype | inference {' / '.join(candidates)} | `auto` picks | "
          f"fwd+bwd {' / '.join(candidates)} | `auto` picks |\n|---|---|---|---:|---|---:|---|")
    for (batch, h, w, d_model, heads), label, spec, dtype in cases:
        (q, k, v), terms = _sweep_problem(spec, batch, h, w, d_model, heads, dtype, device)
        if candidates[0] == "flex" and "value_term" in terms:
            continue
        leaves = [t.detach().requires_grad_(True) for t in (q, k, v)]
        grad_terms = {n: relative_attn.Term(t.values.detach().requires_grad_(True), t.taps) for n, t in terms.items()}

        def infer_fn(b):
            def run():
                with torch.inference_mode():
                    relative_attn.relative_attention(q, k, v, **terms, backend=b)
            return run

        def train_fn(b):
            return lambda: relative_attn.relative_attention(*leaves, **grad_terms, backend=b).sum().backward()

        cells = []
        for make, inputs, mode in ((infer_fn, (q, terms), "inference"), (train_fn, (leaves[0], grad_terms), "train")):
            t = timer.interleaved({b: make(b) for b in candidates})
            with (torch.inference_mode() if mode == "inference" else torch.enable_grad()):
                pick = relative_attn.choose_backend("auto", inputs[0], **inputs[1])
            fastest = min(t, key=lambda b: t[b][0])
            good = pick in t and t[pick][0] <= 1.1 * t[fastest][0]
            cells.append(" / ".join(f"**{t[b][0] * 1e3:.2f}**" if b == fastest else f"{t[b][0] * 1e3:.2f}"
                                    for b in candidates))
            cells.append(f"`{pick}` {'✓' if good else '✗'}")
        print(f"| {batch}, {h}x{w}, {heads}x{d_model // heads} | {label} | {str(dtype).replace('torch.', '')} | "
              + " | ".join(cells) + " |", flush=True)


def _load_original_rpa_ops():
    """The original op's algorithm, compiled by benchmarks/rpa.py (None without a compiler)."""
    spec = importlib.util.spec_from_file_location("bench_rpa", ROOT / "benchmarks" / "rpa.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module._load_reference_ops()


def rpa_ops_table(args, timer, device):
    if device.type != "cpu":
        print("\n(rpa_ops: the original op's algorithm is compiled for the CPU only; skipped)")
        return
    original = _load_original_rpa_ops()
    torch.manual_seed(0)
    H = W = 8
    q = torch.randn(2, 16, H * W)
    affinity = torch.randn(16, 2 * H - 1, 2 * W - 1)
    weight = torch.softmax(torch.randn(2, H * W, H * W), -1)
    fns = {"ours_query": lambda: relative_attend_query2d(q, affinity, H, W),
           "ours_weight": lambda: relative_attend_weight2d(weight, affinity, H, W),
           "ref_query": lambda: relative_attend_query2d(q, affinity, H, W, backend="reference"),
           "ref_weight": lambda: relative_attend_weight2d(weight, affinity, H, W, backend="reference")}
    if original is not None:
        fns["orig_query"] = lambda: original.query_fwd(q, affinity, H, W)
        fns["orig_weight"] = lambda: original.weight_fwd(weight, affinity, H, W)
    t = timer.interleaved({k: (lambda f=f: _no_grad(lambda _: f(), None)) for k, f in fns.items()})

    # gradcheck of the query op in float64 (1 x 2 x 8x8 query, 2 x 15 x 15 table): many small calls
    qd = torch.randn(1, 2, H * W, dtype=torch.float64, requires_grad=True)
    ad = torch.randn(2, 2 * H - 1, 2 * W - 1, dtype=torch.float64, requires_grad=True)
    checks = {"ours": lambda: torch.autograd.gradcheck(lambda a, b: relative_attend_query2d(a, b, H, W), (qd, ad))}
    if original is not None:
        class Original(torch.autograd.Function):
            @staticmethod
            def forward(ctx, a, b):
                ctx.save_for_backward(a, b)
                return original.query_fwd(a, b, H, W)

            @staticmethod
            def backward(ctx, g):
                a, b = ctx.saved_tensors
                return tuple(original.query_bwd(g.contiguous(), a, b, H, W))

        checks["original"] = lambda: torch.autograd.gradcheck(Original.apply, (qd, ad))
    g = Timer(device, 1, timer.clock).interleaved(checks)
    print(f"\nRPA drop-in ops, 8x8 map, query 2x16x64, table 16x15x15, forward (median of {timer.runs})\n")
    print("| op | ours ms | original op's algorithm ms | ours / original | reference formulation ms |\n"
          "|---|---:|---:|---:|---:|")
    for op in ("query", "weight"):
        ours, ref = t[f"ours_{op}"][0], t[f"ref_{op}"][0]
        orig = t.get(f"orig_{op}", (None,))[0]
        print(f"| relative_attend_{op}2d | {ours * 1e3:.3f} | {_ms3(orig)} | {_ratio(ours, orig)} | {ref * 1e3:.3f} |")
    print(f"\ngradcheck(relative_attend_query2d) at 8x8 (float64, 1x2x64 query, 2x15x15 table): ours "
          f"{g['ours'][0]:.2f} s" + (f", original op's algorithm {g['original'][0]:.2f} s" if "original" in g else ""))
    print("\nGoal: the drop-in ops within 3x of the original C++ op's forward time on an 8x8 map.")


def _ms3(seconds):
    return "n/a" if seconds is None else f"{seconds * 1e3:.3f}"


# ----------------------------------------------------------------------------- whole models

def _set_attention_backend(model: nn.Module, backend: str) -> None:
    for m in model.modules():
        if isinstance(m, (RPEMultiheadAttention, RPEAttention, MultiheadNonlocal2d, SASAttention2d)):
            m.backend = backend


def models_table(args, device):
    from zoo.models.detr import build_detr
    from zoo.models.rga import rga_sc_resnet50
    from zoo.models.rsanet import rsanet_r50
    from zoo.models.sasa_resnet import sasa_resnet26

    timer = Timer(device, args.model_runs, args.clock)
    dh, dw = args.detr_size
    clips, frames = args.rsa
    cases = [  # (--skip-models name, label, model, input shape, images per input, today's backend, changed here)
        ("detr", f"DETR-R50 + iRPE rpe-2.0-product-ctx-1-k, {args.detr_batch}x3x{dh}x{dw}",
         lambda: build_detr(enc_rpe2d="rpe-2.0-product-ctx-1-k"), (args.detr_batch, 3, dh, dw), args.detr_batch,
         "reference", True),
        ("rga", f"RGA-SC ResNet-50, {args.rga_batch}x3x256x128", lambda: rga_sc_resnet50(num_classes=751),
         (args.rga_batch, 3, 256, 128), args.rga_batch, None, False),
        ("rsanet", f"RSANet-R50, {clips} clips x {frames} frames at 224", lambda: rsanet_r50(num_segments=frames),
         (clips, 3, frames, 224, 224), clips * frames, None, False),
        ("sasa", f"SASA-ResNet26, {args.sasa_batch}x3x224x224", sasa_resnet26, (args.sasa_batch, 3, 224, 224),
         args.sasa_batch, "native", device.type == "cuda"),
    ]
    print(f"\nWhole models, inference, images/s (frames/s for RSANet), median of {args.model_runs} interleaved runs\n")
    print("| model | today's formulation | new default (`auto`) | speed-up |\n|---|---:|---:|---:|")
    for name, label, make, shape, images, today_backend, changed in cases:
        if name in args.skip_models:
            continue
        torch.manual_seed(0)
        model = make().to(device).eval()
        x = torch.randn(*shape, device=device)
        if not changed:  # this issue changes no layer of this model here: one code path, measured once
            t = timer.interleaved({"new": lambda: _no_grad(model, x)})
            print(f"| {label} | same code | {images / t['new'][0]:.3g} (±{t['new'][1] * 50:.0f}%) | 1.00x (unchanged) |")
            continue
        today = copy.deepcopy(model)
        _set_attention_backend(today, today_backend)
        t = timer.interleaved({"today": lambda: _no_grad(today, x), "new": lambda: _no_grad(model, x)})
        print(f"| {label} | {images / t['today'][0]:.3g} (±{t['today'][1] * 50:.0f}%) | {images / t['new'][0]:.3g} "
              f"(±{t['new'][1] * 50:.0f}%) | {t['today'][0] / t['new'][0]:.2f}x |")
        del today
    print("\ntoday's formulation: attention layers on `reference` (DETR: explicit logits with the fast index "
          "step, as before this change; SASA on CUDA: the native kernel). RGA and RSA have no attention this "
          "change touches, nor has SASA on the CPU (its native op stays).")


# ----------------------------------------------------------------------------- main

TABLES = ("detr_plain", "irpe_k", "irpe_qkv", "deit", "rpa", "sasa", "rpa_ops", "sweep", "models")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tables", nargs="+", choices=TABLES, default=list(TABLES))
    parser.add_argument("--quick", action="store_true", help="small sizes: 12x17 tokens, 16x16 and 28x28 maps, small models and batches")
    parser.add_argument("--runs", type=int, default=7, help="interleaved rounds of the layer tables")
    parser.add_argument("--model-runs", type=int, default=2, help="interleaved rounds of the whole-model table")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    parser.add_argument("--clock", choices=["wall", "thread"], default="wall",
                        help="thread: CPU time of the one compute thread (sets --threads 1; CPU only)")
    parser.add_argument("--no-flex", action="store_true", help="skip FlexAttention rows (they compile on first use)")
    parser.add_argument("--detr-size", type=int, nargs=2, default=(800, 1216), metavar=("H", "W"))
    parser.add_argument("--detr-batch", type=int, default=1)
    parser.add_argument("--rga-batch", type=int, default=8)
    parser.add_argument("--rsa", type=int, nargs=2, default=(8, 16), metavar=("CLIPS", "FRAMES"))
    parser.add_argument("--sasa-batch", type=int, default=8)
    parser.add_argument("--skip-models", nargs="*", default=[], choices=["detr", "rga", "rsanet", "sasa"])
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if args.clock == "thread":
        if device.type != "cpu":
            parser.error("--clock thread measures CPU time: CPU only")
        args.threads = 1
    if args.threads:
        torch.set_num_threads(args.threads)
    flex = not args.no_flex and relative_attn.flex_available(device)
    timer = Timer(device, args.runs, args.clock)
    h, w = (12, 17) if args.quick else (25, 34)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    clock = "thread CPU time" if args.clock == "thread" else "wall time"
    print(f"{datetime.date.today()}, device {device} ({name}), {torch.get_num_threads()} threads, torch "
          f"{torch.__version__}, float32, {clock}, median of {args.runs} interleaved rounds after 1 warm-up; "
          f"load average {' '.join(f'{x:.1f}' for x in os.getloadavg())}")

    size = f"batch 2, L = {h}x{w} = {h * w} tokens, d_model 256, 8 heads"
    if "detr_plain" in args.tables:
        attention_table(f"RPEMultiheadAttention, no RPE (DETR encoder size: {size})", *mha("", 2, h, w), timer,
                        device, flex,
                        note="Goal: plain path <= 1.15x SDPA, inference and fwd+bwd.")
    if "irpe_k" in args.tables:
        attention_table(f"RPEMultiheadAttention + iRPE rpe-2.0-product-ctx-1-k ({size})",
                        *mha("rpe-2.0-product-ctx-1-k", 2, h, w), timer, device, flex, irpe=True,
                        note="Goal: <= 2.0x SDPA inference, <= 1.8x fwd+bwd (GPU: <= 1.3x with FlexAttention).")
    if "irpe_qkv" in args.tables:
        attention_table(f"RPEMultiheadAttention + iRPE rpe-2.0-product-ctx-1-qkv ({size})",
                        *mha("rpe-2.0-product-ctx-1-qkv", 2, h, w), timer, device, flex, irpe=True,
                        note="Goal: <= 3.5x SDPA inference. `flex` has no value term (it needs the probabilities).")
    if "deit" in args.tables:
        side = 7 if args.quick else 14
        for spec in (True, False):
            attention_table(f"RPEAttention (DeiT-S: batch 2, {side}x{side} + cls, 384 wide, 6 heads)"
                            + (", iRPE ctx_product_50_shared_k" if spec else ", no RPE"),
                            *deit(spec, 2, side), timer, device, flex, irpe=spec)
    if "rpa" in args.tables:
        rpa_table(args, timer, device)
    if "sasa" in args.tables:
        sasa_table(args, timer, device, flex)
    if "rpa_ops" in args.tables:
        rpa_ops_table(args, timer, device)
    if "sweep" in args.tables:
        sweep_table(args, timer, device)
    if "models" in args.tables:
        if args.quick:
            args.detr_size, args.rga_batch, args.rsa, args.sasa_batch = (384, 576), 2, (1, 4), 1
        models_table(args, device)
    print(f"\nload average at the end: {' '.join(f'{x:.1f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
