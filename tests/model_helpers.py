"""Tiny transformers models (random weights, built from configs) and a comparison that reports where tensors
differ, for the model-level tests."""
from __future__ import annotations

import torch


def assert_same(actual: torch.Tensor, expected: torch.Tensor, atol: float = 1e-5, rtol: float = 1e-5,
                name: str = "tensor") -> None:
    """|actual - expected| <= atol + rtol·|expected| everywhere; else fail with the max error, its position and
    the NaN/inf counts."""
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    bad = int((~torch.isfinite(a)).sum()), int((~torch.isfinite(e)).sum())
    assert bad == (0, 0), f"{name}: non-finite values (actual {bad[0]}, expected {bad[1]})"
    if a.numel() == 0:
        return
    err = (a - e).abs()
    excess = err - (atol + rtol * e.abs())
    if bool((excess <= 0).all()):
        return
    idx = int(excess.flatten().argmax())
    pos = tuple(int(i) for i in torch.unravel_index(torch.tensor(idx), a.shape))
    raise AssertionError(f"{name}: max error {float(err.max()):.3e}; worst at {pos}: {float(a[pos]):.6g} vs "
                         f"{float(e[pos]):.6g}; {int((excess > 0).sum())}/{a.numel()} out of atol={atol} rtol={rtol}")


def tiny_llama(bias: bool = False, seed: int = 0, cls: str = "LlamaForCausalLM"):
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=61, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                                   attention_bias=bias, mlp_bias=bias, num_labels=3, pad_token_id=0)
    return getattr(transformers, cls)(cfg)


def tiny_opt(seed: int = 0):
    """OPT-style: biases everywhere, project_in/out (word_embed_proj_dim < hidden), lm_head tied to embed_tokens;
    the model's own dropout off, so that train-mode passes are deterministic."""
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.OPTConfig(vocab_size=61, hidden_size=16, ffn_dim=24, num_hidden_layers=2,
                                 num_attention_heads=4, max_position_embeddings=32, word_embed_proj_dim=8,
                                 do_layer_norm_before=False, pad_token_id=1, dropout=0.0,
                                 attention_dropout=0.0)
    return transformers.OPTForCausalLM(cfg)


def tiny_gpt2(seed: int = 0):
    """GPT-2 style: transformers Conv1D layers (fan_in_fan_out weight layout)."""
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(vocab_size=61, n_embd=16, n_layer=2, n_head=4, n_positions=32, resid_pdrop=0.0,
                                  embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(cfg)


def perturb_trainable(model: torch.nn.Module, seed: int = 1, scale: float = 0.1) -> None:
    """Move every trainable parameter off its initial value, so that a test compares trained-looking adapters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g).to(p) * scale)
