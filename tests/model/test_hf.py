"""HFCausalLM: per family, the hooked memory key equals a slow float64 recomputation of the last layer's
feed-forward input (values and gradients); logits are the HF model's; encode gives forward's keys;
activation checkpointing changes nothing but memory; bad folders and configs give one-line errors."""
import json
import math

import pytest
import torch
import torch.nn.functional as F

from trime_dist.core.config import ConfigError
from trime_dist.model.config import ModelConfig
from trime_dist.model.hf import (
    HFCausalLM,
    architecture_of,
    hf_from_config,
    key_module,
    load_pretrained,
    pretrained_model_config,
)
from trime_dist.model.transformer import TransformerLM, build_model

from hf_fixtures import FAMILIES, build_tiny_model, tiny_config, write_tiny_model

V = 300
LLAMA_LIKE = dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=8, max_position_embeddings=64, tie_word_embeddings=False)
VARIANTS = ("gpt2", "gpt_neox", "gpt_neox_serial", "llama", "mistral", "qwen2", "qwen3")


def variant_config(name: str):
    """The tiny config of a family, or of a variant the saved fixtures do not cover."""
    from transformers import AutoConfig

    if name in FAMILIES:
        return tiny_config(name, V)
    if name == "gpt_neox_serial":  # GPT-NeoX without the parallel residual: the mlp sees x + attn
        cfg = tiny_config("gpt_neox", V)
        cfg.use_parallel_residual = False
        return cfg
    return AutoConfig.for_model(name, **LLAMA_LIKE)


def wrapped(name: str, seed: int = 0) -> HFCausalLM:
    cfg = variant_config(name)
    return HFCausalLM(build_tiny_model(cfg, seed), ModelConfig(**architecture_of(cfg)))


# ----------------------------------------------------------------------------- slow references

def causal_attention(q, k, v):
    """q, k, v [B, nh, T, hs] -> [B, T, nh * hs], softmax(q k^T / sqrt(hs)) v with a causal mask."""
    B, nh, T, hs = q.shape
    scores = q @ k.transpose(-1, -2) / math.sqrt(hs)                          # [B, nh, T, T]
    scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    return (scores.softmax(-1) @ v).transpose(1, 2).reshape(B, T, nh * hs)


def rope(x, theta: float, rotary_dims: int):
    """Rotary embedding on the first rotary_dims of x [B, nh, T, hs] (halves rotated, as in GPT-NeoX/Llama)."""
    T = x.shape[2]
    # HF computes its rotary tables in float32 whatever the model's dtype; so does the reference, to keep
    # the float64 comparison tight (an error in the rotation itself would be off by far more).
    inv_freq = 1.0 / theta ** (torch.arange(0, rotary_dims, 2, dtype=torch.float32) / rotary_dims)
    angles = torch.arange(T, dtype=torch.float32)[:, None] * inv_freq[None, :]   # [T, rd / 2]
    angles = torch.cat([angles, angles], -1)
    cos, sin = angles.cos().double(), angles.sin().double()
    rot, rest = x[..., :rotary_dims], x[..., rotary_dims:]
    half = rotary_dims // 2
    rotated = torch.cat([-rot[..., half:], rot[..., :half]], -1)
    return torch.cat([rot * cos + rotated * sin, rest], -1)


def heads(t, n: int):
    B, T, _ = t.shape
    return t.view(B, T, n, -1).transpose(1, 2)                                    # [B, n, T, hs]


def reference_key(model: HFCausalLM, ids: torch.Tensor) -> torch.Tensor:
    """The last layer's mlp input, recomputed from its input (the HF hidden state after the layer before)."""
    hf, c = model.hf_model, model.hf_model.config
    h = hf(input_ids=ids, output_hidden_states=True, use_cache=False).hidden_states[-2]   # [B, T, D]
    layer = hf.base_model.h[-1] if c.model_type == "gpt2" else hf.base_model.layers[-1]
    nh, D = c.num_attention_heads, c.hidden_size
    if c.model_type == "gpt2":       # Conv1D: x @ W + b, W [in, out]
        qkv = layer.ln_1(h) @ layer.attn.c_attn.weight + layer.attn.c_attn.bias
        q, k, v = (heads(t, nh) for t in qkv.split(D, -1))
        y = causal_attention(q, k, v) @ layer.attn.c_proj.weight + layer.attn.c_proj.bias
        return layer.ln_2(h + y)
    theta = c.rope_parameters["rope_theta"]
    if c.model_type == "gpt_neox":
        if c.use_parallel_residual:  # attention and mlp both read the layer input
            return layer.post_attention_layernorm(h)
        hs = D // nh
        qkv = heads(layer.attention.query_key_value(layer.input_layernorm(h)), nh)   # [B, nh, T, 3 hs]
        q, k, v = qkv.chunk(3, -1)
        rd = int(hs * c.rope_parameters.get("partial_rotary_factor", 1.0))
        y = layer.attention.dense(causal_attention(rope(q, theta, rd), rope(k, theta, rd), v))
        return layer.post_attention_layernorm(h + y)
    attn, a = layer.self_attn, layer.input_layernorm(h)                # Llama, Mistral, Qwen2/3
    nkv = c.num_key_value_heads
    q, k, v = heads(attn.q_proj(a), nh), heads(attn.k_proj(a), nkv), heads(attn.v_proj(a), nkv)
    if hasattr(attn, "q_norm"):      # Qwen3: RMSNorm per head before the rotation
        q, k = attn.q_norm(q), attn.k_norm(k)
    hs = q.shape[-1]
    q, k = rope(q, theta, hs), rope(k, theta, hs)
    k, v = k.repeat_interleave(nh // nkv, 1), v.repeat_interleave(nh // nkv, 1)  # grouped-query heads
    return layer.post_attention_layernorm(h + attn.o_proj(causal_attention(q, k, v)))


# ----------------------------------------------------------------------------- keys, logits, encode

@pytest.mark.parametrize("name", VARIANTS)
def test_hooked_key_equals_recomputation_values_and_gradients(name):
    model = wrapped(name).double().eval()
    ids = torch.randint(0, V, (2, 13), generator=torch.Generator().manual_seed(1))
    w = torch.randn(2, 13, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(2))

    _, keys = model(ids)
    (keys * w).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    ref = reference_key(model, ids)
    (ref * w).sum().backward()

    torch.testing.assert_close(keys, ref, rtol=1e-10, atol=1e-10)
    ref_grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert set(grads) == set(ref_grads) and any(".0." in n for n in grads)  # reaches the first layer
    for n in ref_grads:
        torch.testing.assert_close(grads[n], ref_grads[n], rtol=1e-9, atol=1e-10, msg=lambda m: f"{n}: {m}")


@pytest.mark.parametrize("family", FAMILIES)
def test_loaded_folder_gives_hf_logits_and_encode_gives_forward_keys(family, tmp_path):
    from transformers import AutoModelForCausalLM

    path = write_tiny_model(tmp_path / family, family, V)
    model = load_pretrained(ModelConfig(pretrained=str(path))).eval()
    assert (model.cfg.vocab_size, model.cfg.d_model, model.cfg.n_layers, model.cfg.max_seq_len) == (V, 32, 2, 64)
    assert model.cfg.d_ffn == 64 and model.cfg.n_heads == 4
    reference = AutoModelForCausalLM.from_pretrained(path, local_files_only=True).eval()
    ids = torch.randint(0, V, (3, 17), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits, keys = model(ids)
        torch.testing.assert_close(logits, reference(ids).logits, rtol=0, atol=0)
        torch.testing.assert_close(model.encode(ids), keys, rtol=0, atol=0)
    assert keys.shape == (3, 17, 32) and logits.shape == (3, 17, V)
    assert all(k.startswith("hf_model.") for k in model.state_dict())


@pytest.mark.parametrize("family", FAMILIES)
def test_rebuilt_from_config_dict_gives_the_same_model(family):
    model = wrapped(family).eval()
    rebuilt = hf_from_config(json.loads(json.dumps(model.hf_config_dict())))  # as stored in model.json
    rebuilt.load_state_dict(model.state_dict())
    ids = torch.randint(0, V, (2, 9))
    with torch.no_grad():
        for a, b in zip(model(ids), rebuilt.eval()(ids)):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert rebuilt.cfg.d_model == 32 and rebuilt.cfg.vocab_size == V


def test_too_long_input_refused():
    with pytest.raises(ValueError, match="max_seq_len=64"):
        wrapped("llama")(torch.zeros(1, 65, dtype=torch.long))


# ----------------------------------------------------------------------------- activation checkpointing

def _loss_and_grads(model, ids, seed: int = 0):
    """CE of the logits plus a loss on the keys alone (both paths get gradients); dropout seeded."""
    torch.manual_seed(seed)
    logits, keys = model(ids[:, :-1])
    loss = F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten()) + keys.square().mean()
    model.zero_grad()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _count_calls(module):
    calls = []
    module.register_forward_pre_hook(lambda m, a: calls.append(1))
    return calls


def _assert_same(a, b):
    torch.testing.assert_close(a[0], b[0], rtol=0, atol=0)
    assert set(a[1]) == set(b[1])
    for n in a[1]:
        torch.testing.assert_close(a[1][n], b[1][n], rtol=1e-12, atol=1e-12, msg=lambda m: f"{n}: {m}")


def test_builtin_activation_checkpointing_same_loss_and_gradients():
    cfg = ModelConfig(vocab_size=37, n_layers=3, d_model=32, n_heads=4, d_ffn=64, max_seq_len=16, dropout=0.1)
    plain = build_model(cfg, seed=0).double().train()
    ckpt = build_model(ModelConfig(**{**cfg.__dict__, "activation_checkpointing": True}), seed=0).double().train()
    ckpt.load_state_dict(plain.state_dict())
    ids = torch.randint(0, 37, (2, 13))
    calls = _count_calls(ckpt.blocks[-1])
    _assert_same(_loss_and_grads(plain, ids), _loss_and_grads(ckpt, ids))
    assert len(calls) == 2  # the last block ran again in backward: checkpointing was on
    with torch.no_grad():  # eval / no-grad passes are unchanged
        torch.testing.assert_close(ckpt.eval()(ids)[1], plain.eval()(ids)[1], rtol=0, atol=0)


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_hf_activation_checkpointing_same_loss_and_gradients(name):
    plain = wrapped(name).double().train()
    ckpt = wrapped(name).double().train()
    ckpt.enable_activation_checkpointing()
    ids = torch.randint(0, V, (2, 13), generator=torch.Generator().manual_seed(3))
    calls = _count_calls(key_module(ckpt.hf_model))  # HF checkpoints layer.forward: hooks inside it re-run
    _assert_same(_loss_and_grads(plain, ids), _loss_and_grads(ckpt, ids))
    assert len(calls) == 2  # the last layer was recomputed in backward: checkpointing was on

    # The hooked key alone still carries its gradient back into the first layer under checkpointing.
    _, keys = ckpt(ids)
    ckpt.zero_grad()
    keys.sum().backward()
    first = [p.grad for n, p in ckpt.named_parameters() if ".0." in n and p.grad is not None]
    assert first and any(g.abs().max() > 0 for g in first)


def test_activation_checkpointing_through_the_config(tmp_path):
    path = write_tiny_model(tmp_path / "m", "llama", V)
    model = build_model(ModelConfig(pretrained=str(path), activation_checkpointing=True))
    hf = model.hf_model
    assert hf.is_activation_checkpointing if hasattr(hf, "is_activation_checkpointing") else hf.is_gradient_checkpointing


# ----------------------------------------------------------------------------- config and bad input

def test_config_taken_from_the_folder_and_disagreements_refused(tmp_path):
    path = str(write_tiny_model(tmp_path / "m", "gpt2", V))
    cfg = pretrained_model_config(ModelConfig(pretrained=path, vocab_size=V))
    assert (cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.d_ffn, cfg.max_seq_len, cfg.tie_embeddings) == \
        (2, 32, 4, 64, 64, True)
    assert isinstance(build_model(ModelConfig(pretrained=path)), HFCausalLM)
    with pytest.raises(ConfigError, match=r"model\.d_model=64 disagrees with .*config\.json \(32\)"):
        pretrained_model_config(ModelConfig(pretrained=path, d_model=64))
    with pytest.raises(ConfigError, match=r"model\.vocab_size=500"):
        pretrained_model_config(ModelConfig(pretrained=path, vocab_size=500))
    with pytest.raises(ConfigError, match=r"model\.dropout=0\.1"):
        pretrained_model_config(ModelConfig(pretrained=path, dropout=0.1))


def test_bad_folders_give_one_line_errors(tmp_path):
    def message(path):
        with pytest.raises(ValueError) as e:
            load_pretrained(ModelConfig(pretrained=str(path)))
        assert str(path) in str(e.value) and "\n" not in str(e.value)
        return str(e.value)

    assert "no such folder" in message(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    assert "no config.json" in message(tmp_path / "empty")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text("{not json")
    assert "cannot read config.json" in message(tmp_path / "bad")
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    assert "model_type 'bert' is not supported" in message(tmp_path / "bert")
    no_weights = write_tiny_model(tmp_path / "noweights", "gpt2", V)
    (no_weights / "model.safetensors").unlink()
    assert "cannot load the weights" in message(no_weights)


def test_builtin_model_unchanged_without_pretrained():
    assert isinstance(build_model(ModelConfig(vocab_size=37)), TransformerLM)


# ----------------------------------------------------------------------------- torch.compile (run.compile)

def _close(a, b, tol=1e-5):
    torch.testing.assert_close(a[0], b[0], rtol=tol, atol=tol)
    for n in a[1]:
        torch.testing.assert_close(a[1][n], b[1][n], rtol=tol, atol=tol, msg=lambda m: f"{n}: {m}")


@pytest.mark.slow
def test_compiled_blocks_same_loss_gradients_and_names():
    """run.compile: each block torch.compiled in place (inductor, here on the CPU) gives the eager loss and
    gradients, with unchanged parameter names; for an HF model the last layer (the key hook) stays eager."""
    cfg = ModelConfig(vocab_size=37, n_layers=2, d_model=32, n_heads=4, d_ffn=64, max_seq_len=16)
    ids = torch.randint(0, 37, (2, 13), generator=torch.Generator().manual_seed(0))
    eager, compiled = build_model(cfg, seed=0), build_model(cfg, seed=0)
    compiled.compile_blocks()
    assert list(compiled.state_dict()) == list(eager.state_dict())
    _close(_loss_and_grads(eager, ids), _loss_and_grads(compiled, ids))

    plain, hf = wrapped("llama"), wrapped("llama")
    hf.compile_blocks()
    layers = hf.hf_model.model.layers
    assert all(layer._compiled_call_impl is not None for layer in layers[:-1]) and layers[-1]._compiled_call_impl is None
    ids = torch.randint(0, V, (2, 13), generator=torch.Generator().manual_seed(3))
    _close(_loss_and_grads(plain, ids), _loss_and_grads(hf, ids))
