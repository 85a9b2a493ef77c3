"""DETR-R50 + iRPE inference speed vs the same model without RPE, and the iRPE attention paths.

    python benchmarks/irpe.py                 # 800x1216 images (COCO eval size), runs=2, CPU
    python benchmarks/irpe.py --quick         # 384x576, for a fast look
    python benchmarks/irpe.py --device cuda --runs 10

Table 1 (model): images/s of DETR-R50 with no RPE, with iRPE rpe-2.0-product-ctx-1-k on our
fast path (``backend="auto"``: the native ``rpe_index`` op via zoo.ops when it builds, else
torch.gather), and on the reference formulation (``backend="reference"``).
Table 2 (one encoder attention at the same feature-map size, forward only, and forward +
backward in training mode): no RPE vs iRPE ``k`` and ``qkv``, ours vs reference. The qkv rows
show the value-term formulation: ours scatters probabilities into buckets (B, H, L, nb),
the reference gathers a (H, L, L, d) table as the original does.
All rows are measured in the same process, same threads, median of ``runs`` after one warm-up.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a source checkout

from _timing import median_ms  # noqa: E402
from zoo.layers.irpe import RPEMultiheadAttention, iRPE, rpe_config_from_spec  # noqa: E402
from zoo.models.detr import build_detr  # noqa: E402

SPEC = "rpe-2.0-product-ctx-1-k"


def set_backend(model: torch.nn.Module, reference: bool) -> None:
    """Every iRPE module of ``model`` on the reference formulation, or on the fast path ("auto")."""
    for module in model.modules():
        if isinstance(module, iRPE):
            module.backend = "reference" if reference else "auto"


def bench_models(height: int, width: int, batch: int, runs: int, device: torch.device) -> list[tuple]:
    images = torch.randn(batch, 3, height, width, device=device)
    rows = []
    torch.manual_seed(0)
    plain = build_detr(enc_rpe2d="").to(device).eval()
    with_rpe = build_detr(enc_rpe2d=SPEC).to(device).eval()
    # same weights for everything the two share, so only the RPE differs
    with_rpe.load_state_dict(plain.state_dict(), strict=False)
    for label, model, ref in (("DETR-R50, no RPE", plain, False), (f"DETR-R50 + iRPE {SPEC} (ours)", with_rpe, False),
                              (f"DETR-R50 + iRPE {SPEC} (reference formulation)", with_rpe, True)):
        set_backend(model, ref)
        with torch.inference_mode():
            seconds = median_ms(lambda: model(images), runs, device) / 1000
        rows.append((label, seconds, batch / seconds))
    return rows


def bench_attention(h: int, w: int, batch: int, runs: int, device: torch.device) -> list[tuple]:
    L, d_model, heads = h * w, 256, 8
    x = torch.randn(L, batch, d_model, device=device)
    rows = []
    configs = [("no RPE", "", False), ("iRPE k (ours)", SPEC, False), ("iRPE k (reference)", SPEC, True),
               ("iRPE qkv (ours)", "rpe-2.0-product-ctx-1-qkv", False),
               ("iRPE qkv (reference)", "rpe-2.0-product-ctx-1-qkv", True)]
    for label, spec, ref in configs:
        torch.manual_seed(0)
        attn = RPEMultiheadAttention(d_model, heads, dropout=0.1, rpe_config=rpe_config_from_spec(spec)).to(device)
        set_backend(attn, ref)
        attn.eval()
        with torch.inference_mode():
            fwd = median_ms(lambda: attn(x, x, x, hw=(h, w)), runs, device) / 1000
        attn.train()
        xg = x.clone().requires_grad_(True)

        def step():
            out, _ = attn(xg, xg, xg, hw=(h, w), need_weights=False)
            out.sum().backward()

        train = median_ms(step, runs, device) / 1000
        rows.append((label, fwd, train))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="384x576 images instead of 800x1216")
    parser.add_argument("--height", type=int, default=None)
    parser.add_argument("--width", type=int, default=None)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    parser.add_argument("--skip-model", action="store_true", help="only the attention table")
    args = parser.parse_args()
    height = args.height or (384 if args.quick else 800)
    width = args.width or (576 if args.quick else 1216)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    h, w = -(-height // 32), -(-width // 32)  # feature map of the stride-32 backbone
    print(f"device {device} ({torch.get_num_threads()} threads), torch {torch.__version__}, images {height}x{width}, "
          f"batch {args.batch}, median of {args.runs} runs after 1 warm-up")

    if not args.skip_model:
        rows = bench_models(height, width, args.batch, args.runs, device)
        base = rows[0][1]
        print("\n| model | s / batch | images / s | vs no RPE |\n|---|---|---|---|")
        for label, seconds, ips in rows:
            print(f"| {label} | {seconds:.3f} | {ips:.2f} | {seconds / base:.2f}x |")

    rows = bench_attention(h, w, 2, args.runs, device)
    base_f, base_t = rows[0][1], rows[0][2]
    print(f"\nOne encoder RPEMultiheadAttention, L = {h}x{w} = {h * w}, batch 2, d_model 256, 8 heads")
    print("| attention | forward s (eval) | vs no RPE | fwd+bwd s (train) | vs no RPE |\n|---|---|---|---|---|")
    for label, fwd, train in rows:
        print(f"| {label} | {fwd:.4f} | {fwd / base_f:.2f}x | {train:.4f} | {train / base_t:.2f}x |")


if __name__ == "__main__":
    main()
