"""Builders shared by the train tests: tiny transformers models with random weights, saved as safetensors."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

# Small enough for milliseconds per forward, large enough for GQA (4 query heads over 2 k/v heads).
COMMON: dict[str, Any] = {"vocab_size": 96, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2,
                          "num_attention_heads": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-5}
# name -> (transformers config class, settings that exercise what the architecture adds)
ARCHITECTURES: dict[str, tuple[str, dict[str, Any]]] = {
    # wavelengths of head_dim 8 at theta 1e4: 6.3, 63, 628, 6283 against original 64 / {1, 4}:
    # one kept, one blended, two divided: every branch of the llama3 rule
    "llama3": ("LlamaConfig", {"attention_bias": True, "mlp_bias": True, "rope_parameters": {
        "rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 64}}),
    "mistral": ("MistralConfig", {"sliding_window": 4}),  # shorter than the test sequences
    "qwen2": ("Qwen2Config", {"use_sliding_window": True, "sliding_window": 4, "max_window_layers": 1}),
    "qwen3": ("Qwen3Config", {"head_dim": 16, "tie_word_embeddings": True}),  # head_dim != hidden / heads
}
# Gemma 2/3 and Phi-3 (tests/train/test_families.py): caps small enough that tanh bends the random
# scores and logits; windows shorter than the test sequences; query_pre_attn_scalar != head_dim
FAMILIES: dict[str, tuple[str, dict[str, Any]]] = {
    "gemma2": ("Gemma2Config", {"head_dim": 16, "query_pre_attn_scalar": 12, "attn_logit_softcapping": 1.5,
                                "final_logit_softcapping": 2.5, "sliding_window": 4}),
    # sliding blocks' own plain RoPE base; the global block's RoPE linearly scaled
    "gemma3_text": ("Gemma3TextConfig", {"head_dim": 8, "query_pre_attn_scalar": 10, "sliding_window": 4,
                                         "layer_types": ["sliding_attention", "full_attention"], "rope_parameters": {
                                             "sliding_attention": {"rope_type": "default", "rope_theta": 100.0},
                                             "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}}}),
    # LongRoPE past 6 positions (the test sequences have 9), RoPE on 6 of 8 dims, a window on every block
    "phi3": ("Phi3Config", {"original_max_position_embeddings": 6, "max_position_embeddings": 24, "sliding_window": 5,
                            "pad_token_id": None, "bos_token_id": 1, "eos_token_id": 2, "rope_parameters": {
                                "rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 0.75,
                                "short_factor": [1.0, 1.3, 2.1], "long_factor": [1.5, 3.0, 7.0]}}),
}


def randomise_(model: torch.nn.Module, seed: int) -> None:
    """Weights of a trained look: N(0, 0.2) matrices, norms near 1, small biases (transformers' init is near zero)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if name.endswith("norm.weight"):
                param.copy_(1 + 0.1 * noise)
            else:
                param.copy_(noise * (0.2 if param.dim() == 2 else 0.1))


def write_hf_model(out: Path, name: str, *, seed: int = 0, **overrides: Any) -> Path:
    """Save a tiny random ``name`` model (see ARCHITECTURES, FAMILIES) with transformers' save_pretrained;
    ``overrides`` replace settings (e.g. the vocabulary size)."""
    import transformers

    config_class, settings = {**ARCHITECTURES, **FAMILIES}[name]
    config = getattr(transformers, config_class)(**{**COMMON, **settings, **overrides})
    model = transformers.AutoModelForCausalLM.from_config(config)
    randomise_(model, seed)
    model.save_pretrained(out)
    return out


def load_hf_model(folder: Path) -> torch.nn.Module:
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def batch(vocab: int, *, seed: int = 0, length: int = 9) -> tuple[torch.Tensor, torch.Tensor]:
    """Three rows of ``length`` token ids and a padding mask: left-padded, right-padded and full."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (3, length), generator=generator)
    mask = torch.ones(3, length, dtype=torch.bool)
    mask[0, :3] = False
    mask[1, -2:] = False
    return ids, mask


def next_token_targets(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``loss_sum``'s targets for ``ids``: each real position's next token, -100 where there is none."""
    targets = torch.where(mask, ids, -100).roll(-1, dims=1)
    targets[:, -1] = -100
    return targets


def assert_logits_match(ours: torch.nn.Module, theirs: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor, *,
                        atol: float) -> float:
    """Our Decoder's logits against a transformers model's, unpadded and with ``mask``'s padding, at
    the real positions (padded ones mean nothing in either); returns the largest difference."""
    worst = 0.0
    with torch.no_grad():
        for attention_mask in (None, mask):
            got = ours(ids, attention_mask=attention_mask)
            want = theirs(ids, attention_mask=None if attention_mask is None else attention_mask.long()).logits
            real = torch.ones_like(mask) if attention_mask is None else mask
            torch.testing.assert_close(got[real].to(want.dtype), want[real], atol=atol, rtol=0)
            worst = max(worst, (got[real].to(want.dtype) - want[real]).abs().max().item())
    return worst


class Faulty(torch.nn.Module):
    """A Decoder whose ``at_call``-th loss raises KeyboardInterrupt ("interrupt") or is NaN ("nan")."""

    def __init__(self, model: torch.nn.Module, *, at_call: int, fault: str) -> None:
        super().__init__()
        self.model, self.at_call, self.fault, self.calls = model, at_call, fault, 0

    def loss_sum(self, input_ids: torch.Tensor, targets: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        self.calls += 1
        if self.calls == self.at_call and self.fault == "interrupt":
            raise KeyboardInterrupt
        loss = self.model.loss_sum(input_ids, targets, **kwargs)
        return loss * float("nan") if self.calls == self.at_call else loss

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:  # everything else is the wrapped Decoder's
            return getattr(self._modules["model"], name)
