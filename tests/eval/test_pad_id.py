"""pad_id is never a real token: padding with an id that also occurs in the data (as a tokenizer without a
pad token does, padding with its EOD id) leaves the training loss and gradients, the datastore's keys and
values, and eval's NLL and token counts exactly as with a pad id the data never holds (bit for bit: causal
attention gives the right-padded positions zero weight), for the built-in model and HF-wrapped ones."""
import shutil

import numpy as np
import pytest
import torch
from shard_fixtures import all_segments, write_segment_dir

from trime_dist.core import shards
from trime_dist.datastore.parts import Part, encode_part, part_paths
from trime_dist.eval.evaluate import EvalSetting, eval_pass
from trime_dist.model.config import ModelConfig
from trime_dist.model.transformer import build_model
from trime_dist.train.loader import ShardDataset, group_to_batch
from trime_dist.train.loss import LossSpec, micro_batch_loss

V, L = 40, 16


@pytest.fixture(scope="module", params=["builtin", "gpt2", "llama"])
def model(request):
    if request.param == "builtin":
        return build_model(ModelConfig(vocab_size=V, d_model=16, n_heads=2, d_ffn=32, max_seq_len=L), seed=3).eval()
    from hf_fixtures import tiny_config

    from trime_dist.model.hf import hf_from_config

    torch.manual_seed(3)
    return hf_from_config(tiny_config(request.param, V).to_dict()).eval()


@pytest.fixture(scope="module")
def two_pads(tmp_path_factory, model):
    """The same shards twice: pad_id 0 (never in the data: tokens are >= 2) and pad_id = the most frequent token."""
    root = tmp_path_factory.mktemp("pad")
    manifest = write_segment_dir(str(root / "unused"), [70, 45, 16, 90, 23, 5], seq_len=L, vocab_size=V,
                                 per_shard=3)
    tokens = np.concatenate(list(all_segments(str(root / "unused")).values()))
    busy = int(np.bincount(tokens, minlength=V).argmax())
    assert busy != 0 and manifest["tokenizer"]["pad_id"] == 0
    shutil.copytree(root / "unused", root / "busy")
    shards.write_manifest(str(root / "busy"), dict(manifest, tokenizer=dict(manifest["tokenizer"], pad_id=busy)))
    return root, model


def _train_losses(data_dir, model, layout):
    """(loss, n_tokens, input_ids, parameter gradients) of each group of 4 rows, as one rank trains it."""
    out = []
    for group in ShardDataset(data_dir, 4, drop_last=False).iter_epoch(0):
        batch = group_to_batch(group, np.arange(4))
        model.zero_grad()
        logits, keys = model(batch.input_ids)                          # [B, T, V], [B, T, D]
        res = micro_batch_loss(logits, keys, batch, LossSpec(layout, temperature=1.3), layout)
        res.loss.backward()
        out.append((res.loss.detach(), batch.n_tokens, batch.input_ids, [p.grad.clone() for p in model.parameters()]))
    return out


@pytest.mark.parametrize("layout", ["none", "local", "long"])
def test_training_loss_and_gradients_ignore_the_pad_id(two_pads, layout):
    root, model = two_pads
    a, b = _train_losses(str(root / "unused"), model, layout), _train_losses(str(root / "busy"), model, layout)
    assert len(a) == len(b) > 3
    assert any(not torch.equal(x[2], y[2]) for x, y in zip(a, b))   # the padding does differ
    for (loss_a, n_a, _, grads_a), (loss_b, n_b, _, grads_b) in zip(a, b):
        assert n_a == n_b
        assert torch.equal(loss_b, loss_a)
        for ga, gb in zip(grads_a, grads_b):
            assert torch.equal(gb, ga)


def test_datastore_keys_and_values_ignore_the_pad_id(two_pads, tmp_path):
    root, model = two_pads
    out = {}
    for name in ("unused", "busy"):
        manifest = shards.read_manifest(str(root / name))
        paths = part_paths(str(tmp_path / name), Part(0, 0, manifest["segments"]))
        n = encode_part(model, str(root / name), manifest, Part(0, 0, manifest["segments"]), paths, batch_size=3)
        out[name] = n, np.load(paths["keys"]), np.load(paths["values"])
    assert out["busy"][0] == out["unused"][0] == shards.read_manifest(str(root / "busy"))["tokens"]
    np.testing.assert_array_equal(out["busy"][2], out["unused"][2])
    np.testing.assert_array_equal(out["busy"][1], out["unused"][1])


@pytest.mark.parametrize("context", [0, 5])
def test_eval_nll_and_token_counts_ignore_the_pad_id(two_pads, context):
    root, model = two_pads
    settings = [EvalSetting(model="m", memory=m, mem_size=40, temperature=1.2) for m in ("none", "local", "long")]
    taus = [[1.0, 1.2]] * len(settings)
    got = {name: eval_pass(model, str(root / name), shards.read_manifest(str(root / name)), settings, {}, taus,
                           context_window=context, batch_size=3)["settings"] for name in ("unused", "busy")}
    for a, b in zip(got["unused"], got["busy"]):
        assert a["tokens"] == b["tokens"] == shards.read_manifest(str(root / "busy"))["tokens"]
        np.testing.assert_array_equal(b["nll"], a["nll"])
