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


def write_hf_model(out: Path, name: str, *, seed: int = 0) -> Path:
    """Save a tiny random ``name`` model (see ARCHITECTURES) with transformers' save_pretrained."""
    import transformers

    config_class, settings = ARCHITECTURES[name]
    config = getattr(transformers, config_class)(**COMMON, **settings)
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
