#!/usr/bin/env bash
# The GPU check of issue 9, in one go on one GPU machine (no network needed), at most ~8 minutes:
#   1. `pytest -m gpu` (every stage's GPU path against the CPU run),
#   2. benchmarks/gpu/bench_gpu.py (issue 21: CE tokens/s and MFU of `trime train` at each ZeRO stage vs a bare
#      torch loop at micro-batch 1 and at the largest that fits; trime_local / long / ext step / CE step with 8
#      ranks' memory in interleaved rounds; most memory keys per step, encode keys/s, exact and faiss search
#      rates, eval tokens/s external vs local),
#   3. benchmarks/bench_host_overhead.py (issue 21: host time per optimizer step of `trime train` vs a bare
#      torch loop, each ZeRO stage, precision and accumulation 1 / 6, on the GPU; ~2 minutes),
#   4. benchmarks/bench_exact_search.py (issue 22: exact search over 1M keys, scan vs selection; ~1 minute).
# Usage, from the repository root:  bash benchmarks/gpu/check.sh [OUT_DIR]
# Python packages the machine lacks (deepspeed, faiss-cpu, webdataset, omegaconf, ...) are installed from
# wheels in .whl/ when that folder exists (see benchmarks/gpu/README.md for how to fill it).
set -u
OUT_DIR=${OUT:-runs/gpu_check}
if [ $# -gt 0 ]; then OUT_DIR=$1; shift; fi   # the rest goes to bench_gpu.py
mkdir -p "$OUT_DIR"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "installing .whl/ failed"; exit 1; }
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export DS_BUILD_OPS=0 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}
{ nvidia-smi; python3 -c "import torch, sys; print(sys.version); print('torch', torch.__version__, torch.version.cuda, torch.cuda.get_device_name())"
  python3 -c "import faiss; print('faiss', faiss.__version__, 'GPUs seen by faiss:', faiss.get_num_gpus())"
  python3 -c "import deepspeed; print('deepspeed', deepspeed.__version__)"; } 2>&1 | tee "$OUT_DIR/env.txt"
echo "== pytest -m gpu"
timeout "${PYTEST_TIMEOUT:-240}" python3 -m pytest -m gpu -q -rs -p no:cacheprovider --continue-on-collection-errors \
  ${PYTEST_K:+-k "$PYTEST_K"} tests 2>&1 | tee "$OUT_DIR/pytest_gpu.log"
echo "== benchmarks/gpu/bench_gpu.py"
timeout "${BENCH_TIMEOUT:-360}" python3 benchmarks/gpu/bench_gpu.py --out "$OUT_DIR" "$@" > "$OUT_DIR/bench.log" 2>&1
grep -v -e "it/s]" -e "batch/s]" "$OUT_DIR/bench.log" | tail -n 80
echo "== benchmarks/bench_host_overhead.py"
timeout "${HOST_BENCH_TIMEOUT:-240}" python3 benchmarks/bench_host_overhead.py --rounds 6 --steps 3 \
  --out "$OUT_DIR/host_overhead.json" > "$OUT_DIR/host_overhead.log" 2>&1
grep -e "^|" -e "^Host time" "$OUT_DIR/host_overhead.log"
echo "== benchmarks/bench_exact_search.py"
# issue 22: exact search over 1M keys of d = 1024 (fp16 on the GPU), the matmul vs the top-k selection and the
# block-pruned selection vs a full topk; target >= 200k queries/s at k = 1024
timeout "${EXACT_BENCH_TIMEOUT:-120}" python3 benchmarks/bench_exact_search.py --device cuda --keys 1000000 \
  --dim 1024 --queries 3072 --k 16,1024 --repeats 3 > "$OUT_DIR/exact_search.log" 2>&1
grep -e "^|" "$OUT_DIR/exact_search.log"
