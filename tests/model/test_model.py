"""Model: shapes, causality, tied embeddings, memory keys = the last FFN input after its LN (also via encode()),
and the tokenizer check of an exported model against data."""
import pytest
import torch

from trime_dist.model.config import ModelConfig
from trime_dist.model.export import check_tokenizer
from trime_dist.model.transformer import TransformerLM


def _model(**kw):
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=37, n_layers=3, d_model=32, n_heads=4, d_ffn=64, max_seq_len=16, **kw)
    return TransformerLM(cfg).eval()


def test_shapes_and_tied_embeddings():
    model = _model()
    logits, keys = model(torch.randint(0, 37, (2, 11)))
    assert logits.shape == (2, 11, 37) and keys.shape == (2, 11, 32)
    assert model.lm_head.weight.data_ptr() == model.tok_emb.weight.data_ptr()


def test_causal():
    model = _model()
    x = torch.randint(0, 37, (1, 12))
    y = x.clone()
    y[0, 7:] = (y[0, 7:] + 5) % 37
    (lx, kx), (ly, ky) = model(x), model(y)
    torch.testing.assert_close(lx[:, :7], ly[:, :7])
    torch.testing.assert_close(kx[:, :7], ky[:, :7])
    assert not torch.allclose(lx[:, 7:], ly[:, 7:])


def test_memory_keys_are_last_ffn_input():
    model = _model()
    captured = {}
    model.blocks[-1].ffn.register_forward_hook(lambda m, inp, out: captured.update(x=inp[0]))
    x = torch.randint(0, 37, (2, 9))
    _, keys = model(x)
    torch.testing.assert_close(keys, captured["x"])
    # ... and that is the output of the last block's FFN layer norm.
    captured_ln = {}
    model.blocks[-1].ln_ffn.register_forward_hook(lambda m, inp, out: captured_ln.update(y=out))
    _, keys = model(x)
    torch.testing.assert_close(keys, captured_ln["y"])


def test_too_long_input_refused():
    model = _model()
    try:
        model(torch.zeros(1, 17, dtype=torch.long))
    except ValueError as e:
        assert "max_seq_len" in str(e)
    else:
        raise AssertionError("expected ValueError")


def test_encode_gives_forward_keys_exactly_without_the_last_ffn():
    model = _model(dropout=0.1)  # eval mode: dropout off, as in the datastore
    x = torch.randint(0, 37, (3, 13))
    calls = []
    model.blocks[-1].ffn.register_forward_hook(lambda m, inp, out: calls.append(1))
    model.lm_head.register_forward_hook(lambda m, inp, out: calls.append(2))
    keys = model.encode(x)
    assert calls == []  # neither the last feed-forward nor the output layer ran
    _, ref = model(x)
    assert keys.shape == (3, 13, 32) and torch.equal(keys, ref)


def test_check_tokenizer_refuses_data_of_another_tokenizer():

    manifest = {"tokenizer": {"sha256": "ab" * 32}}
    check_tokenizer({"tokenizer_sha256": "ab" * 32}, manifest, "data/test", "runs/a")
    check_tokenizer({}, manifest, "data/test", "runs/a")  # a model without a recorded tokenizer: not checked
    with pytest.raises(ValueError, match=r"data/test was tokenized with tokenizer abababababab\.\.\., but the model "
                                         r"runs/a was trained with tokenizer cdcdcdcdcdcd\.\.\."):
        check_tokenizer({"tokenizer_sha256": "cd" * 32}, manifest, "data/test", "runs/a")
