#!/usr/bin/env bash
# GPU benchmarks (DiT-XL/2 at 256x256, i.e. 32x32x4 latents), for a machine with python3 + torch.
# Usage: benchmarks/gpu.sh PHASE...   phases: env train sample-eager sample-compile sample-graphs profile profile-sample ab
# Results go to $BENCH_RESULTS (default benchmarks/results). diffusers may come as wheels in .whl/.
set -u
export PYTHONUNBUFFERED=1 BENCH_RESULTS=${BENCH_RESULTS:-${OUT:-benchmarks/results}}
PY=${PY:-python3}
if ls .whl/*.whl >/dev/null 2>&1 && ! $PY -c "import diffusers" 2>/dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
B_TRAIN=${B_TRAIN:-64} B_SAMPLE=${B_SAMPLE:-32}
for phase in "$@"; do
  echo "=== $phase $(date -u +%T)"
  case $phase in
    env) nvidia-smi -L; $PY -c "import torch, diffusers; print(torch.__version__, torch.version.cuda, diffusers.__version__)";;
    train) timeout 420 $PY -m benchmarks.train_step --presets DiT-XL/2 --batch-size $B_TRAIN --input-size 32 \
             --variants ${VARIANTS:-bf16,bf16+compile,bf16+ckpt,fp32} --rounds 3 --steps 5 --warmup 3 --tag xl2-b$B_TRAIN;;
    sample-eager) timeout 300 $PY -m benchmarks.sampling --preset DiT-XL/2 --batch-size $B_SAMPLE --input-size 32 --bf16 \
             --rounds 2 --max-evals ${MAX_EVALS:-25} --tag xl2-bf16-eager;;
    sample-compile) timeout 420 $PY -m benchmarks.sampling --preset DiT-XL/2 --batch-size $B_SAMPLE --input-size 32 --bf16 \
             --compile --rounds 2 --max-evals ${MAX_EVALS:-50} --tag xl2-bf16-compile;;
    sample-graphs) timeout 420 $PY -m benchmarks.sampling --preset DiT-XL/2 --batch-size $B_SAMPLE --input-size 32 --bf16 \
             --compile reduce-overhead --rounds 2 --max-evals ${MAX_EVALS:-50} --tag xl2-bf16-graphs;;
    profile) timeout 300 $PY -m benchmarks.profile_step --preset DiT-XL/2 --batch-size $B_TRAIN --bf16 --out "$BENCH_RESULTS";;
    ab) timeout 240 $PY -m benchmarks.ab_block --preset DiT-XL/2 --batch-size $B_SAMPLE --rounds 3 --repeats 3 --tag xl2-b$B_SAMPLE;;
    profile-sample) timeout 300 $PY -m benchmarks.profile_step --preset DiT-XL/2 --batch-size $B_SAMPLE --bf16 --mode sample --who ours,peer --shapes --rows 40 --out "$BENCH_RESULTS";;
  esac
done
