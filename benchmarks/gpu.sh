#!/usr/bin/env bash
# The GPU checks of the fused attention paths, in one go and in under 8 minutes on one GPU:
#   1. build the native ops with their CUDA sources (in parallel, cached in $RELZOO_EXTENSIONS_DIR),
#   2. the CUDA tests (FlexAttention / SDPA paths vs the reference, forward and backward; the native
#      ops' CUDA kernels),
#   3. benchmarks/attention.py --device cuda (every attention table and the whole models),
# and appends what they print to benchmarks/RESULTS.md under a dated heading naming the GPU.
#
#   bash benchmarks/gpu.sh                   # from the repository root or anywhere
#   PYTHON=/path/to/python bash benchmarks/gpu.sh
#
# Each step has its own time limit (they sum to 7 min 40 s); a step that fails or runs out of time is
# recorded as such in RESULTS.md (with what it printed until then) and the next one still runs. The
# GPU goals' tables (iRPE k with FlexAttention, SASA k=7 at 56x56) run first.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-${RELZOO_VENV:-$HOME/.cache/relzoo/venv}/bin/python}
[ -x "$PY" ] || PY=python
export RELZOO_OPS_CUDA=1 PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}"
OUT=$(mktemp)
trap 'rm -f "$OUT"' EXIT

gpu=$("$PY" -c "import torch; print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')")
if [ -z "$gpu" ]; then
  echo "gpu.sh: no CUDA device visible to torch; nothing to run" >&2
  exit 1
fi

step() {  # step SECONDS TITLE COMMAND...: run, fence the output, note a failure or a timeout
  local limit=$1 title=$2
  shift 2
  echo "### $title" >> "$OUT"
  echo >> "$OUT"
  echo '```' >> "$OUT"
  local start=$SECONDS
  timeout "$limit" "$@" 2>&1 | grep -v "Warning: " | tee -a "$OUT"
  local rc=${PIPESTATUS[0]}
  echo '```' >> "$OUT"
  case $rc in
    0) echo "($((SECONDS - start)) s)" >> "$OUT" ;;
    124) echo "**stopped after ${limit} s (time limit of this step)**" >> "$OUT" ;;
    *) echo "**exit status $rc after $((SECONDS - start)) s**" >> "$OUT" ;;
  esac
  echo >> "$OUT"
}

{
  echo
  echo "## GPU: \`bash benchmarks/gpu.sh\` ($(date +%Y-%m-%d), $gpu)"
  echo
  echo "$("$PY" -c "import torch, platform; print(f'torch {torch.__version__}, CUDA {torch.version.cuda}, python {platform.python_version()}')")"
  echo
} >> "$OUT"

# 1. native ops with CUDA sources, in parallel (each nvcc build takes minutes)
step 170 "native op builds (CUDA)" "$PY" - <<'EOF'
import concurrent.futures, subprocess, sys, time
ops = ["rpe_index", "neighborhood_attn", "relative_attn"]  # relative_attn: CPU kernel only (no .cu)
code = "import sys; from zoo.ops.build import build; print(build(sys.argv[1], cuda=True))"
start = time.time()
with concurrent.futures.ThreadPoolExecutor(len(ops)) as pool:
    runs = list(pool.map(lambda op: subprocess.run([sys.executable, "-c", code, op], capture_output=True, text=True), ops))
for op, run in zip(ops, runs):
    print(op, "ok" if run.returncode == 0 else "FAILED\n" + run.stdout[-2000:] + run.stderr[-4000:])
print(f"{time.time() - start:.0f} s")
EOF

# 2. CUDA tests
step 100 "CUDA tests" "$PY" -m pytest -q -p no:cacheprovider -rs \
  tests/test_relative_attn.py tests/test_sasa_op.py tests/test_ops.py -k "cuda or flex"

# 3. benchmarks on the GPU
step 80 "benchmarks/attention.py --device cuda (the GPU goals: iRPE k, SASA)" "$PY" benchmarks/attention.py \
  --device cuda --runs 20 --tables irpe_k sasa
step 70 "benchmarks/attention.py --device cuda (the other layers, what auto picks)" "$PY" benchmarks/attention.py \
  --device cuda --runs 20 --tables detr_plain irpe_qkv deit rpa sweep
step 40 "benchmarks/attention.py --device cuda (whole models)" "$PY" benchmarks/attention.py --device cuda \
  --model-runs 5 --tables models

cat "$OUT" >> benchmarks/RESULTS.md
echo "appended to benchmarks/RESULTS.md"
