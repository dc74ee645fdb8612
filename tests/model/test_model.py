"""Model: shapes, causality, tied embeddings, and that memory keys are the last FFN input after its LN."""
import torch

from trime_dist.model.config import ModelConfig
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
