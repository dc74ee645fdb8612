"""Every stage's GPU path, against the CPU fp32 run of the same code (`pytest -m gpu`; skipped without CUDA).

bf16 tolerances: the GPU runs under bf16 autocast (as encode/eval do) or bf16 DeepSpeed (as training does);
the CPU reference is fp32.
"""
import datetime
import sys
import json
import os

import numpy as np
import pytest
import torch

from trime_dist.core.constants import IGNORE_INDEX
from trime_dist.model.config import ModelConfig
from trime_dist.model.transformer import build_model
from trime_dist.train.batch import Batch
from trime_dist.train.config import TrainConfig
from trime_dist.train.loss import build_loss_spec, micro_batch_loss

from cli_runner import CONFIGS, run_trime
from shard_fixtures import write_pattern_splits

pytestmark = pytest.mark.gpu
CUDA = torch.device("cuda", 0)
TINY = ModelConfig(vocab_size=50, n_layers=2, d_model=64, n_heads=4, d_ffn=128, max_seq_len=64)


def _batch(B=4, T=48, V=50, seed=0):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(2, V, (B, T + 1), generator=g)
    targets = tokens[:, 1:].clone()
    targets[1, 40:] = IGNORE_INDEX
    return Batch(input_ids=tokens[:, :-1].contiguous(), targets=targets, stream=torch.tensor([0, 0, 1, 1]),
                 stream_index=torch.tensor([0, 1, 0, 1]), row=torch.arange(B),
                 group_tokens=int((targets != IGNORE_INDEX).sum()))


def _loss_and_grads(model, batch, spec, layout, device, autocast):
    model = model.to(device)
    model.zero_grad()
    batch = batch.to(device)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        logits, keys = model(batch.input_ids)
    out = micro_batch_loss(logits, keys, batch, spec, layout)
    out.loss.backward()
    return float(out.loss), {n: p.grad.detach().float().cpu() for n, p in model.named_parameters()}


@pytest.mark.parametrize("objective", ["ce", "trime_local", "trime_long", "trime_ext"])
def test_training_step_of_each_objective_matches_cpu_fp32(objective):
    cfg = TrainConfig()
    cfg.objective.name, cfg.memory.tile_size = objective, 64   # several tiles on the tiled paths
    spec = build_loss_spec(cfg)
    layout, _ = spec.step_memory(10**6, 10**6)
    batch = _batch()
    ref_loss, ref_grads = _loss_and_grads(build_model(TINY, seed=0), batch, spec, layout, "cpu", False)
    loss, grads = _loss_and_grads(build_model(TINY, seed=0), batch, spec, layout, CUDA, True)
    assert loss == pytest.approx(ref_loss, rel=2e-2)
    for name, g in ref_grads.items():   # bf16: compare directions and sizes, not elements
        cos = torch.nn.functional.cosine_similarity(grads[name].flatten(), g.flatten(), dim=0)
        assert cos > 0.98, (name, float(cos))
        assert float(grads[name].norm()) == pytest.approx(float(g.norm()), rel=0.1)


def test_all_gather_with_grad_and_nccl_reduce_scatter_backward():
    """World size 1 on one GPU: the NCCL path of _AllGatherWithGrad (all_gather forward, reduce_scatter backward)."""
    import torch.distributed as dist

    from trime_dist.core import distributed as tdist
    from trime_dist.core.launch_env import free_port

    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1,
                            timeout=datetime.timedelta(seconds=60), device_id=CUDA)
    try:
        x = torch.randn(5, 3, device=CUDA, requires_grad=True)
        y = tdist._AllGatherWithGrad.apply(x)
        w = torch.randn(5, 3, device=CUDA)
        (y * w).sum().backward()
        assert dist.get_backend() == "nccl"
        torch.testing.assert_close(y.detach(), x.detach())
        torch.testing.assert_close(x.grad, w)
        sizes = tdist._gather_sizes(7, CUDA)
        assert sizes == [7]
    finally:
        dist.destroy_process_group()


def test_sdpa_causal_path_runs_flash_attention_and_compile_matches_eager():
    from torch.nn.attention import SDPBackend, sdpa_kernel

    model = build_model(TINY, seed=0).to(CUDA).eval()
    ids = torch.randint(2, 50, (2, 64), device=CUDA)
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        ref_logits, ref_keys = model(ids)
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):   # raises if the causal call cannot use flash
            logits, keys = model(ids)
        torch.testing.assert_close(logits, ref_logits)
        model.compile_blocks()
        c_logits, c_keys = model(ids)
    torch.testing.assert_close(c_logits.float(), ref_logits.float(), rtol=3e-2, atol=3e-2)
    torch.testing.assert_close(c_keys.float(), ref_keys.float(), rtol=3e-2, atol=3e-2)


def test_fused_adamw_on_gpu_parameters():
    from trime_dist.train.engine import build_optimizer, param_groups

    cfg = TrainConfig()
    gpu_opt = build_optimizer(param_groups(build_model(TINY, seed=0).to(CUDA), 0.1), cfg.optim)
    cpu_opt = build_optimizer(param_groups(build_model(TINY, seed=0), 0.1), cfg.optim)
    assert gpu_opt.defaults["fused"] is True and not cpu_opt.defaults["fused"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpu_data")
    write_pattern_splits(root, real_tokenizer=True, valid_real_tokenizer=True)
    return root


@pytest.mark.parametrize("objective,compiled,precision", [("trime_local", True, "bf16"),
                                                         ("trime_long", False, "bf16_autocast")])
def test_trime_train_on_gpu_bf16_checkpointed(data, tmp_path, objective, compiled, precision):
    """`trime train` end to end on the GPU (DeepSpeed bf16, ZeRO-1, NCCL group of one, activation
    checkpointing, torch.compile once): the loss falls."""
    out = tmp_path / "run"
    run_trime(["train", "--config", os.path.join(CONFIGS, "tiny.yaml"), f"data.train={data}/train",
               f"data.valid={data}/valid", f"run.out_dir={out}", "run.max_steps=30", "model.max_seq_len=32",
               "run.log_every=1", f"objective.name={objective}", f"deepspeed.precision={precision}",
               "deepspeed.zero_stage=1", f"run.compile={str(compiled).lower()}", "model.activation_checkpointing=true",
               "optim.warmup_steps=5", "optim.lr=3e-3"], timeout=600)
    steps = [json.loads(line) for line in open(out / "metrics.jsonl") if '"loss"' in line]
    assert len(steps) == 30 and all(np.isfinite(s["loss"]) for s in steps)
    assert np.mean([s["loss"] for s in steps[-5:]]) < np.mean([s["loss"] for s in steps[:5]]) - 0.3
    summary = json.load(open(out / "summary.json"))
    assert summary["final"]["valid_memory_ppl"] < summary["start"]["valid_memory_ppl"]


def _export_tiny(data, path) -> str:
    """An untrained tiny model exported as a run, with the data's tokenizer."""
    from trime_dist.model.export import export_model

    cfg = ModelConfig(**{**TINY.__dict__, "max_seq_len": 32})
    manifest = json.load(open(data / "train" / "manifest.json"))
    export_model(build_model(cfg, seed=0).state_dict(), cfg, str(path),
                 {"step": 0, "tokenizer_sha256": manifest["tokenizer"]["sha256"], "train_manifest_sha256": "x",
                  "seq_len": 32})
    return str(path)


def test_datastore_encode_and_exact_search_on_gpu_match_cpu(data, tmp_path):
    from trime_dist.datastore.build import build_datastore
    from trime_dist.datastore.config import DatastoreConfig
    from trime_dist.datastore.store import open_datastore

    run = _export_tiny(data, tmp_path / "model")
    stores = {}
    for device in ("cpu", "cuda"):
        build_datastore(DatastoreConfig(model=run, data=str(data / "train"), out=str(tmp_path / device),
                                        device=device, batch_size=8))
        stores[device] = open_datastore(str(tmp_path / device))
    cpu_keys, gpu_keys = stores["cpu"].all_keys(), stores["cuda"].all_keys()
    np.testing.assert_array_equal(stores["cpu"].values, stores["cuda"].values)
    rel = np.linalg.norm(gpu_keys - cpu_keys, axis=1) / np.linalg.norm(cpu_keys, axis=1)
    assert np.median(rel) < 2e-2 and rel.max() < 0.1   # bf16 autocast vs fp32
    # exact search on the GPU (fp16 scan + fp32 rescoring) = faiss Flat on the same stored keys
    ds = stores["cuda"]
    queries = torch.from_numpy(cpu_keys[::7][:200])
    f_scores, f_ids, f_labels = ds.search(queries.numpy(), 17, 1)
    ds.use_exact_search(CUDA)
    scores, ids, labels = ds.search_tensor(queries.to(CUDA), 16, 1)
    np.testing.assert_allclose(scores.cpu().numpy(), f_scores[:, :16], rtol=1e-4, atol=1e-4)
    # the same neighbours wherever the 16th is not tied with the 17th (an untrained model has duplicate keys)
    clear = f_scores[:, 15] - f_scores[:, 16] > 1e-3
    assert clear.mean() > 0.5
    np.testing.assert_array_equal(np.sort(ids.cpu().numpy()[clear], 1), np.sort(f_ids[clear, :16], 1))


def test_eval_on_gpu_matches_cpu(data, tmp_path):
    from trime_dist.cli import main

    run = _export_tiny(data, tmp_path / "model")
    ds = str(tmp_path / "ds")
    assert main(["datastore", "build", "--model", run, "--data", str(data / "train"), "--out", ds]) == 0
    rows = {}
    for device, search in (("cpu", "faiss"), ("cuda", "faiss"), ("cuda", "exact")):
        out = tmp_path / f"{device}-{search}.json"
        assert main(["eval", "--model", run, "--data", str(data / "valid"), "--memory", "local", "long", "external",
                     "--datastore", ds, "--k", "64", "--device", device, "--search", search, "--out", str(out)]) == 0
        rows[device, search] = {r["memory"]: r for r in json.load(open(out))}
    for key in (("cuda", "faiss"), ("cuda", "exact")):
        for memory, ref in rows["cpu", "faiss"].items():
            assert rows[key][memory]["tokens"] == ref["tokens"]
            assert rows[key][memory]["loss"] == pytest.approx(ref["loss"], rel=1e-2), (key, memory)


def test_side_stream_search_runs_on_its_own_stream_after_its_inputs():
    """eval's search (core/device.run_on_side_stream, from a worker thread): its kernels on a second stream, after
    the event of the inputs it reads, and the main stream reads its result only after its done event."""
    from concurrent.futures import ThreadPoolExecutor

    from trime_dist.core.device import mark_ready, run_on_side_stream, side_stream, use_side_results

    torch.cuda.set_device(CUDA)
    stream = side_stream(CUDA)
    x = torch.randn(4096, 4096, device=CUDA)
    keys = x @ x          # queued on the default stream: the side work must wait for it
    ready = mark_ready(stream, CUDA)

    def search(keys):
        return torch.cuda.current_stream(CUDA), torch.topk(keys @ keys.T, 8, dim=1).values

    with ThreadPoolExecutor(1) as pool:
        (used, top), done = pool.submit(run_on_side_stream, stream, ready, search, keys).result()
    use_side_results(done, [top], CUDA)
    assert used == stream and used != torch.cuda.default_stream(CUDA)
    expected = torch.topk(keys @ keys.T, 8, dim=1).values
    torch.testing.assert_close(top, expected)


def test_bf16_autocast_inside_deepspeed_on_gpu():
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "train"))
    from test_loss_paths import run_autocast_engine

    seen, param_dtype, device = run_autocast_engine()
    assert seen == [torch.bfloat16] and param_dtype == torch.float32 and device.startswith("cuda")


def test_eval_faiss_on_the_gpu_with_float16_lookup_tables(data, tmp_path, caplog):
    """GPU faiss present: eval's IVF-PQ index searches on the rank's GPU (float16 lookup tables), says so in the
    log, and gives the CPU faiss rows within float16 tolerance."""
    import logging

    from trime_dist.cli import main
    from trime_dist.datastore import index as dsi

    if not dsi.gpu_faiss_available():
        pytest.skip("the installed faiss has no GPU support")
    run = _export_tiny(data, tmp_path / "model")
    ds = str(tmp_path / "ds")
    assert main(["datastore", "build", "--model", run, "--data", str(data / "train"), "--out", ds,
                 "--factory", "IVF16,PQ16", "--train-sample", "4000"]) == 0
    rows = {}
    for device in ("cpu", "cuda"):
        out = tmp_path / f"{device}.json"
        with caplog.at_level(logging.INFO, logger="trime_dist.eval.evaluate"):
            assert main(["eval", "--model", run, "--data", str(data / "valid"), "--memory", "external",
                         "--datastore", ds, "--k", "64", "--nprobe", "8", "--device", device, "--out", str(out)]) == 0
        rows[device] = json.load(open(out))[0]
    assert "with GPU faiss on cuda:0 (float16 lookup tables)" in caplog.text
    assert "with CPU faiss (" in caplog.text
    assert rows["cuda"]["tokens"] == rows["cpu"]["tokens"]
    assert rows["cuda"]["loss"] == pytest.approx(rows["cpu"]["loss"], rel=2e-2)
