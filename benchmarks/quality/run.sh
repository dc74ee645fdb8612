#!/usr/bin/env bash
# The whole pipeline on real text (prepare -> group -> train CE / TrimeLM / TrimeLM_long / TrimeLM_ext -> datastores
# -> eval -> report), plus TrimeLM_ext trained without objective.ext_exclude_future for comparison.
#   bash benchmarks/quality/run.sh [WIKITEXT_FILE] [OUT]     (default: ../shared/data/wikitext2-valid.tokens)
set -euo pipefail
TEXT=${1:-../shared/data/wikitext2-valid.tokens}
OUT=${2:-runs/quality}
B=$(dirname "$(command -v python)")
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} DS_BUILD_OPS=0 TOKENIZERS_PARALLELISM=false
python benchmarks/quality/split_wikitext.py "$TEXT" "$OUT/corpus"
trime demo --corpus "$OUT/corpus" --out "$OUT"
# the same TrimeLM_ext recipe with the query's own continuation allowed in its memory (the old behaviour)
deepspeed --num_gpus 2 --master_port 35977 "$B/trime" train --config configs/tiny.yaml objective.name=trime_ext \
  objective.ext_exclude_future=false data.train="$OUT/data/train_bm25" data.valid="$OUT/data/valid" \
  run.out_dir="$OUT/runs/trime_ext_with_future" run.max_steps=300 run.seed=1234
MASTER_PORT=57977 mpiexec -n 2 trime datastore build --model "$OUT/runs/trime_ext_with_future" \
  --data "$OUT/data/train" --out "$OUT/datastore/trime_ext_with_future" --factory IVF256,PQ32 --threads 1
trime eval --data "$OUT/data/test" --valid "$OUT/data/valid" --tau-search 1.0,1.25,1.5 --k 256 --nprobe 16 \
  --mem-size 1024 --threads 1 --out "$OUT/eval_extra.json" \
  --setting "name=TrimeLM_ext (continuation allowed),model=$OUT/runs/trime_ext_with_future,memory=external,datastore=$OUT/datastore/trime_ext_with_future" \
  --setting "name=TrimeLM_ext (continuation allowed) as long,model=$OUT/runs/trime_ext_with_future,memory=long" \
  --setting "name=TrimeLM_ext as long,model=$OUT/runs/trime_ext,memory=long"
trime report "$OUT/runs" "$OUT/eval.json" "$OUT/eval_extra.json" --out "$OUT/report"
