"""`trime eval` on R ranks: the deal of whole streams to ranks, the table's columns, and 2 real CPU ranks through
the command line (DeepSpeed launcher, `trime launch local`) against one process: same token counts, same losses,
same τ / λ / τ_knn searches and sweeps; the exact store sharded over the ranks (a rank with no stream still serves
its shard); a shard that does not fit stops every rank with one line."""
import json
import os
import socket

import pytest
import torch

from trime_dist.eval.windows import StreamSize, deal_streams, iter_windows, stream_sizes
from trime_dist.model.config import ModelConfig
from trime_dist.model.export import export_model
from trime_dist.model.transformer import build_model

from cli_runner import run_trime
from dist_helpers import run_distributed
from shard_fixtures import write_segment_dir

# ----------------------------------------------------------------------------- the deal


def test_deal_whole_streams_balanced_and_deterministic():
    sizes = [StreamSize(s, w, t) for s, w, t in [(0, 5, 70), (1, 3, 45), (2, 1, 16), (3, 6, 90), (4, 2, 33)]]
    dealt = deal_streams(sizes, 2)
    # largest first to the lighter rank: 90 -> r0, 70 -> r1, 45 -> r1, 33 -> r0, 16 -> r1 (loads 123, 131)
    assert dealt == [[3, 4], [0, 1, 2]]
    tokens = {s.stream: s.tokens for s in sizes}
    loads = [sum(tokens[x] for x in d) for d in dealt]
    assert sorted(x for d in dealt for x in d) == [0, 1, 2, 3, 4]      # every stream once, whole
    assert max(loads) - min(loads) <= max(tokens.values())
    assert all(d == sorted(d) for d in dealt)                          # each rank's in manifest order
    assert deal_streams(sizes, 2) == dealt                             # depends on the sizes only
    assert deal_streams(sizes, 1) == [[0, 1, 2, 3, 4]]
    assert deal_streams(sizes[:1], 3) == [[0], [], []]                 # more ranks than streams: some get none
    with pytest.raises(ValueError, match="world size 0"):
        deal_streams(sizes, 0)


@pytest.fixture(scope="module")
def splits(tmp_path_factory):
    """A run, a train split (the datastore's), a test split of 5 streams, a valid split of 3, a one-stream split,
    and a Flat datastore built in this process."""
    from trime_dist.datastore.build import build_datastore
    from trime_dist.datastore.config import DatastoreConfig

    root = tmp_path_factory.mktemp("multirank")
    write_segment_dir(str(root / "train"), [130] * 6 + [41], seq_len=16, vocab_size=40, per_shard=7, noise=0.3)
    write_segment_dir(str(root / "test"), [70, 45, 16, 90, 33], seq_len=16, vocab_size=40, per_shard=3,
                      noise=0.3, seed=9)
    write_segment_dir(str(root / "valid"), [50, 20, 61], seq_len=16, vocab_size=40, per_shard=4, noise=0.3, seed=5)
    write_segment_dir(str(root / "one"), [75], seq_len=16, vocab_size=40, per_shard=2, noise=0.3, seed=7)
    cfg = ModelConfig(vocab_size=40, d_model=16, n_heads=2, d_ffn=32, max_seq_len=16)
    export_model(build_model(cfg, seed=0).state_dict(), cfg, str(root / "run"),
                 {"step": 0, "tokenizer_sha256": "0" * 64, "train_manifest_sha256": "x", "seq_len": 16})
    build_datastore(DatastoreConfig(model=str(root / "run"), data=str(root / "train"), out=str(root / "ds")))
    return root


@pytest.mark.parametrize("context", [0, 6])
def test_the_ranks_windows_are_one_process_windows(splits, context):
    """Each rank's windows (its streams) together are exactly one process's windows, each stream's on one rank."""
    from trime_dist.core import shards

    data = str(splits / "test")
    manifest = shards.read_manifest(data)
    whole = [(w.stream, w.start, w.score_from) for w in iter_windows(data, manifest, 16, context)]
    sizes = stream_sizes(data, manifest, 16, context)
    assert [s.stream for s in sizes] == [0, 1, 2, 3, 4]
    assert sum(s.tokens for s in sizes) == manifest["tokens"] and sum(s.windows for s in sizes) == len(whole)
    dealt = deal_streams(sizes, 2)
    parts = [[(w.stream, w.start, w.score_from) for w in iter_windows(data, manifest, 16, context, streams=set(d))]
             for d in dealt]
    assert sorted(parts[0] + parts[1]) == sorted(whole)
    assert not {s for s, _, _ in parts[0]} & {s for s, _, _ in parts[1]}


# ----------------------------------------------------------------------------- the table


def test_table_keeps_its_columns_with_long_setting_names(capsys):
    from trime_dist.eval.cli import print_table

    row = {"memory": "long", "temperature": 1.0, "knn_lambda": 0.0, "knn_temperature": None, "k": None,
           "nprobe": None, "tokens": 1234, "loss": 3.5, "ppl": 33.1162, "word_ppl": None, "bits_per_byte": None}
    names = ["local", "TrimeLM_long@mem_size=0", "TrimeLM_ext (train store rescored)@knn_temperature=10.5"]
    print_table([dict(row, name=n, ranks=2) for n in names], "data/test")
    lines = capsys.readouterr().out.splitlines()
    assert lines[1] == "Perplexity on data/test (2 ranks)"
    header, body = lines[2], lines[3:6]
    for name, line in zip(names, body):
        assert line.startswith(name + " ")                         # the name, then at least one space
        assert line[header.index("memory"):].startswith("long ")  # the memory column where the header has it
        assert len(line) == len(header)                            # the right-aligned columns end together
        assert line.split()[-5:] == ["1234", "3.5000", "33.116", "-", "-"]


# ----------------------------------------------------------------------------- 2 real ranks


def _eval_args(root, out, *extra):
    ds = str(root / "ds")
    return ["eval", "--model", str(root / "run"), "--data", str(root / "test"), "--valid", str(root / "valid"),
            "--k", "8", "--mem-size", "20", "--batch-size", "2", "--device", "cpu", "--threads", "1",
            "--tau-search", "0.8,1.0,1.6", "--lambda-search", "0.1,0.4", "--knn-temperature-search", "1,3",
            "--setting", "name=local,memory=local",
            "--setting", f"name=ext+interp,memory=external,datastore={ds},knn_lambda=0.25",
            "--setting", "name=TrimeLM_long,memory=long",
            "--sweep", "mem_size=0,20", "--out", str(out), *extra]


def _same_rows(many, one):
    assert [r["name"] for r in many] == [r["name"] for r in one]
    for a, b in zip(many, one):
        assert a["tokens"] == b["tokens"]                                   # exact
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5), a["name"]
        for key in ("temperature", "knn_lambda", "knn_temperature", "k", "mem_size", "word_ppl"):
            assert a[key] == pytest.approx(b[key], rel=1e-5) if isinstance(b[key], float) else a[key] == b[key]
        for key in ("tau_search", "lambda_search", "knn_temperature_search"):
            assert (a[key] is None) == (b[key] is None), key
            if b[key]:
                assert a[key].keys() == b[key].keys()
                assert [a[key][v] for v in b[key]] == pytest.approx(list(b[key].values()), rel=1e-5)


def test_two_ranks_through_the_cli_equal_one_process(splits, tmp_path):
    """deepspeed --num_gpus 2 trime eval ... (2 CPU ranks, faiss Flat: each rank its own replica): every row --
    searched τ / λ / τ_knn, swept mem_size -- as one process gives it; one table, one JSON with ranks = 2."""
    from trime_dist.cli import main

    one, two = tmp_path / "one.json", tmp_path / "two.json"
    assert main(_eval_args(splits, one)) == 0
    proc = run_trime(_eval_args(splits, two), ranks=2, timeout=600)
    rows1, rows2 = json.load(open(one)), json.load(open(two))
    assert len(rows2) == 6 and {r["ranks"] for r in rows2} == {2} and {r["ranks"] for r in rows1} == {1}
    assert rows2[0]["tokens"] == 70 + 45 + 16 + 90 + 33 - 5               # every target of the test split once
    _same_rows(rows2, rows1)
    assert proc.stdout.count("Perplexity on") == 1 and "(2 ranks)" in proc.stdout   # rank 0's table only
    log = proc.stderr + proc.stdout                                       # the deal of test_deal_whole_streams...
    assert "rank 0 of 2 scores 2 of 5 streams" in log and "rank 1 of 2 scores 3 of 5 streams" in log
    assert "faiss search (Flat) with CPU faiss (1 threads), rank 1's own replica" in log


def test_exact_store_sharded_over_two_ranks_with_more_ranks_than_streams(splits, tmp_path):
    """`trime launch local --nproc 2 -- eval --search exact` over a one-stream split: rank 1 scores nothing but
    holds half the keys and serves every round's search; the rows equal one process's exact search."""
    from trime_dist.cli import main
    from trime_dist.datastore.store import open_datastore

    ds = str(splits / "ds")
    args = ["eval", "--model", str(splits / "run"), "--data", str(splits / "one"), "--k", "8", "--mem-size", "20",
            "--batch-size", "2", "--device", "cpu", "--search", "exact", "--context-window", "4",
            "--setting", f"name=ext,memory=external,datastore={ds}",
            "--setting", f"name=knn,memory=none,datastore={ds},knn_lambda=0.3"]
    one, two = tmp_path / "one.json", tmp_path / "two.json"
    assert main([*args, "--out", str(one)]) == 0
    proc = run_trime(["launch", "local", "--nproc", "2", "--", *args, "--out", str(two)], ranks=1, timeout=600)
    rows1, rows2 = json.load(open(one)), json.load(open(two))
    assert rows2[0]["ranks"] == 2 and rows2[0]["tokens"] == rows1[0]["tokens"] == 74
    _same_rows(rows2, rows1)
    count = open_datastore(ds, load_values=False).meta["count"]
    log = proc.stdout + proc.stderr
    assert f"keys [0, {(count + 1) // 2}) of {count} (rank 0 of 2)" in log
    assert f"keys [{(count + 1) // 2}, {count}) of {count} (rank 1 of 2)" in log
    assert "rank 1 of 2 scores 0 of 1 streams" in log
    assert proc.stdout.count("Perplexity on") == 1


def _open_sharded(rank, world_size, root, frees):
    """open_stores on each rank with frees[i][rank] bytes free, for each i: what each rank raises (or the keys
    [lo, hi) it holds), one entry per i."""
    import trime_dist.datastore.exact as exact
    from trime_dist.core import shards
    from trime_dist.eval.evaluate import EvalSetting, open_stores
    from trime_dist.model.export import load_model

    _, info = load_model(os.path.join(root, "run"))
    manifest = shards.read_manifest(os.path.join(root, "test"))
    s = EvalSetting(model="m", memory="external", datastore=os.path.join(root, "ds"))
    out = []
    for free in frees:
        exact.free_bytes = lambda device: free[rank]
        try:
            stores = open_stores([s], info, manifest, os.path.join(root, "test"), "exact", torch.device("cpu"),
                                 rank=rank, world_size=world_size)
        except ValueError as e:
            out.append(str(e))
            continue
        out.append((stores[s.datastore]._exact.lo, stores[s.datastore]._exact.hi))
    return out


def test_a_shard_that_does_not_fit_stops_every_rank_with_one_line(splits):
    """Rank 1 has too little memory for its half of the keys: both ranks raise (rank 0 naming rank 1), one line;
    with enough memory each holds its half."""
    (err0, halves0), (err1, halves1) = run_distributed(_open_sharded, 2,
                                                       args=(str(splits), [[10 ** 12, 1000], [10 ** 12] * 2]))
    assert err1.startswith(f"datastore {splits / 'ds'}: --search exact on 2 rank(s) holds ")
    assert "run on more ranks" in err1 and "\n" not in err1
    assert err0 == f"rank 1 on {socket.gethostname()}: " + err1
    assert halves0[0] == 0 and halves0[1] == halves1[0] and halves1[1] > halves1[0]


def test_faiss_search_device_is_the_cpu_without_gpu_faiss(splits):
    """The GPU-faiss switch checked on CPU faiss: a CUDA device keeps the index on the CPU, saying why; the store
    opened for eval reports where its index searches."""
    from trime_dist.datastore import index as dsi
    from trime_dist.datastore.store import open_datastore

    if dsi.gpu_faiss_available():
        pytest.skip("this faiss has GPU support (tests/gpu covers it)")
    ds = open_datastore(str(splits / "ds"))
    index = ds.index(1)
    same, where = dsi.to_search_device(index, torch.device("cuda", 0))
    assert same is index and where.startswith("CPU faiss (") and "no GPU support" in where
    assert dsi.to_search_device(index, torch.device("cpu"))[1].startswith("CPU faiss (")
    assert ds.use_faiss_on(torch.device("cuda", 0)) == where and ds.search_where == where
    scores, ids, _ = ds.search(ds.all_keys()[:3], 4, 1)
    assert (ids[:, 0] >= 0).all()


# ----------------------------------------------------------------------------- faiss shards (--search faiss-shard)

_SHARD_ASKED = {0: [slice(0, 9), slice(9, 30), slice(0, 0)], 1: [slice(30, 40), slice(0, 0), slice(40, 64)]}


def _faiss_shard_rounds(rank, world_size, path, queries, k, nprobe):
    """Each rank loads its shard of the index and searches its own queries (none in one round) over all shards."""
    from trime_dist.datastore.store import open_datastore

    ds = open_datastore(path)
    ds.use_faiss_shard(torch.device("cpu"), nprobe, rank, world_size)
    held = (*ds.faiss_shard[:2], int(ds.index(nprobe).ntotal))
    return held, [ds.search_tensor(torch.from_numpy(queries[a]), k, nprobe) for a in _SHARD_ASKED[rank]]


@pytest.mark.parametrize("factory", ["Flat", "IVF4,Flat", "IVF4,PQ4"])
def test_faiss_index_sharded_over_two_ranks_equals_one_process(splits, tmp_path, factory):
    """2 gloo ranks, each holding half the index's entries (ids [lo, hi)): every rank's queries get the one-process
    search's scores, ids and labels (ids compared wherever the k-th score is not tied: the tiny model's keys repeat)."""
    import numpy as np

    from trime_dist.datastore.build import build_datastore
    from trime_dist.datastore.config import DatastoreConfig
    from trime_dist.datastore.store import open_datastore

    path = str(splits / "ds") if factory == "Flat" else str(tmp_path / "ds")
    if factory != "Flat":
        build_datastore(DatastoreConfig(model=str(splits / "run"), data=str(splits / "train"), out=path,
                                        factory=factory))
    one = open_datastore(path)
    queries = (one.all_keys()[::12][:64] + np.random.default_rng(3).normal(0, 0.05, (64, 16))).astype(np.float32)
    k, nprobe = 8, 2
    (held0, got0), (held1, got1) = run_distributed(_faiss_shard_rounds, 2, args=(path, queries, k, nprobe))
    count = int(one.meta["count"])
    assert held0 == (0, (count + 1) // 2, (count + 1) // 2) and held1 == ((count + 1) // 2, count, count // 2)
    for rank, got in ((0, got0), (1, got1)):
        for (s, i, lab), a in zip(got, _SHARD_ASKED[rank]):
            ref_s, ref_i, ref_lab = one.search(queries[a], k, nprobe)
            assert s.shape == (len(ref_s), k)
            np.testing.assert_allclose(s.numpy(), ref_s, rtol=1e-5, atol=1e-5)
            for row in range(len(ref_s)):
                above = ref_s[row] > ref_s[row, -1] + 1e-5          # the entries not tied with the k-th
                assert set(i[row].numpy()[above]) == set(ref_i[row][above])
            assert (lab.numpy() == one.values[i.numpy()]).all()
