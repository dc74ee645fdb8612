#!/usr/bin/env bash
# "External memory must help" (issue 10): on the models and datastores of benchmarks/quality/run.sh, measure
#  (a) the paper's TrimeLM_ext protocol (external neighbours in the softmax + a separately calibrated kNN
#      distribution, τ / λ / kNN temperature chosen on valid) against the external memory used either way alone;
#  (b) datastore relevance: stores over the training text vs over training + test text (the test documents
#      themselves in the store: the most relevant a store can be), for TrimeLM_ext and for kNN-LM on CE;
#  (c) k and τ sweeps of the in-softmax external memory; an exact (Flat) store and --rescore against IVF-PQ;
#  (d) keys and queries with 64 tokens of context (datastore build and eval --context-window 64);
#  (e) kNN-LM as published: an L2 store (--metric l2), distances recomputed from the stored keys (--rescore).
#   bash benchmarks/quality/ext_memory.sh [QUALITY_OUT] [OUT]     (defaults: runs/quality runs/ext_memory)
set -euo pipefail
Q=${1:-runs/quality}
OUT=${2:-runs/ext_memory}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} TOKENIZERS_PARALLELISM=false
port() { echo $((20000 + RANDOM % 20000)); }
rm -rf "$OUT/corpus_train_test" && mkdir -p "$OUT/corpus_train_test"   # prepare reads files in path order
cp -r "$Q/corpus/train" "$OUT/corpus_train_test/a_train"
cp -r "$Q/corpus/test" "$OUT/corpus_train_test/b_test"
[ -f "$OUT/data/train_test/manifest.json" ] || trime prepare --input "$OUT/corpus_train_test" \
  --output "$OUT/data/train_test" --seq-len 128 --tokenizer "$Q/data/train/tokenizer.json"
for m in trime_ext ce; do
  MASTER_PORT=$(port) mpiexec -n 2 trime datastore build --model "$Q/runs/$m" --data "$OUT/data/train_test" \
    --out "$OUT/ds/${m}_train_test" --factory IVF256,PQ32 --threads 1
done
MASTER_PORT=$(port) mpiexec -n 2 trime datastore build --model "$Q/runs/trime_ext" --data "$Q/data/train" \
  --out "$OUT/ds/trime_ext_flat" --factory Flat --threads 1
EXT="model=$Q/runs/trime_ext" CE="model=$Q/runs/ce" TRAIN_EXT="$Q/datastore/trime_ext" TT="$OUT/ds"
SEARCH=(--data "$Q/data/test" --valid "$Q/data/valid" --k 256 --nprobe 16 --mem-size 1024 --threads 1 --device cpu)
# (a) + (b)
trime eval "${SEARCH[@]}" --tau-search 1,1.25,1.5,2,3 --lambda-search 0.05,0.1,0.2,0.3,0.5,0.7,0.9 \
  --knn-temperature-search 1,3,10,30 --out "$OUT/relevance.json" \
  --setting "name=kNN-LM (train store),$CE,memory=none,datastore=$Q/datastore/ce,knn_lambda=0.25" \
  --setting "name=kNN-LM (train+test store),$CE,memory=none,datastore=$TT/ce_train_test,knn_lambda=0.25" \
  --setting "name=ext as long,$EXT,memory=long" \
  --setting "name=ext (train store),$EXT,memory=external,datastore=$TRAIN_EXT" \
  --setting "name=ext (train store rescored),$EXT,memory=external,datastore=$TRAIN_EXT,rescore=true" \
  --setting "name=ext (train store Flat),$EXT,memory=external,datastore=$TT/trime_ext_flat" \
  --setting "name=ext (train+test store),$EXT,memory=external,datastore=$TT/trime_ext_train_test" \
  --setting "name=ext+interp (train store),$EXT,memory=external,datastore=$TRAIN_EXT,knn_lambda=0.25" \
  --setting "name=ext+interp (train+test store),$EXT,memory=external,datastore=$TT/trime_ext_train_test,knn_lambda=0.25" \
  --setting "name=long+interp (train store),$EXT,memory=long,datastore=$TRAIN_EXT,knn_lambda=0.25" \
  --setting "name=long+interp (train+test store),$EXT,memory=long,datastore=$TT/trime_ext_train_test,knn_lambda=0.25"
# (c) k and τ of the in-softmax external memory (one pass; τ fixed per row, no search)
trime eval "${SEARCH[@]}" --out "$OUT/sweep_k_tau.json" \
  --setting "name=ext,$EXT,memory=external,datastore=$TRAIN_EXT" \
  --sweep k=4,16,64,256,1024 --sweep temperature=1,1.5,2,3
# (d) context windows: keys encoded with the context their queries get
MASTER_PORT=$(port) mpiexec -n 2 trime datastore build --model "$Q/runs/trime_ext" --data "$Q/data/train" \
  --out "$OUT/ds/trime_ext_c64" --factory IVF256,PQ32 --context-window 64 --threads 1
trime eval "${SEARCH[@]}" --context-window 64 --tau-search 1,1.25,1.5,2,3 --lambda-search 0.05,0.1,0.2,0.3,0.5,0.7 \
  --knn-temperature-search 1,3,10,30 --out "$OUT/context64.json" \
  --setting "name=ext as long (C=64),$EXT,memory=long" \
  --setting "name=ext (C=64 store),$EXT,memory=external,datastore=$TT/trime_ext_c64" \
  --setting "name=long+interp (C=64 store),$EXT,memory=long,datastore=$TT/trime_ext_c64,knn_lambda=0.25"
# (e) kNN-LM with kNN-LM's L2 store vs the inner-product one
MASTER_PORT=$(port) mpiexec -n 2 trime datastore build --model "$Q/runs/ce" --data "$Q/data/train" \
  --out "$OUT/ds/ce_l2" --factory IVF256,PQ32 --metric l2 --threads 1
trime eval "${SEARCH[@]}" --lambda-search 0.1,0.25,0.5,0.7 --knn-temperature-search 1,3,10,30,100 \
  --out "$OUT/knnlm_l2.json" \
  --setting "name=kNN-LM ip,$CE,memory=none,datastore=$Q/datastore/ce,knn_lambda=0.25" \
  --setting "name=kNN-LM l2 rescored,$CE,memory=none,datastore=$TT/ce_l2,knn_lambda=0.25,rescore=true" \
  --setting "name=kNN-LM l2,$CE,memory=none,datastore=$TT/ce_l2,knn_lambda=0.25"
trime report "$OUT/relevance.json" "$OUT/sweep_k_tau.json" "$OUT/context64.json" "$OUT/knnlm_l2.json" \
  --out "$OUT/report"
