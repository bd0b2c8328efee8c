"""The learned horizon head ("K-head", docs/method.md §9).

A two-layer MLP on the backbone's final hidden state (after the final norm, i.e. what
`output_hidden_states=True` returns last) that scores k ∈ {1…k_max}. The sampler feeds it the state
that the PREVIOUS forward produced at the last committed (clean) token it fed, and uses
K = argmax + 1 for the next step; train it on exactly that state. The first step of a request has no
previous forward and uses K = 1.

Saved as safetensors with its shape in the metadata, so `HorizonHead.load(path)` needs nothing else.
"""

from __future__ import annotations

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from pipeline.errors import FluidError

FORMAT = "fluid-horizon-head-v1"


class HorizonHead(nn.Module):
    def __init__(self, hidden_size: int, k_max: int, inner_size: int | None = None):
        super().__init__()
        if hidden_size < 1 or k_max < 1:
            raise ValueError(f"HorizonHead needs hidden_size >= 1 and k_max >= 1, got {hidden_size}, {k_max}")
        self.hidden_size, self.k_max = hidden_size, k_max
        self.inner_size = inner_size or max(64, hidden_size // 2)
        self.fc1 = nn.Linear(hidden_size, self.inner_size)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(self.inner_size, k_max)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits over k = 1…k_max (index i is k = i + 1), shape [..., k_max]."""
        return self.fc2(self.act(self.fc1(hidden.to(self.fc1.weight.dtype))))

    @torch.no_grad()
    def predict(self, hidden: torch.Tensor) -> torch.Tensor:
        """The horizon K (1-based, int64) for each hidden state [..., hidden_size]."""
        return self.forward(hidden).argmax(dim=-1) + 1

    def save(self, path) -> None:
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        meta = {"format": FORMAT, "hidden_size": str(self.hidden_size), "k_max": str(self.k_max),
                "inner_size": str(self.inner_size)}
        save_file(state, str(path), metadata=meta)

    @classmethod
    def load(cls, path, device: str | torch.device | None = None) -> HorizonHead:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        if meta.get("format") != FORMAT:
            raise FluidError(f"{path} is not a FLUID horizon head (metadata format={meta.get('format')!r})")
        head = cls(int(meta["hidden_size"]), int(meta["k_max"]), int(meta["inner_size"]))
        head.load_state_dict(load_file(str(path)))
        return head.to(device) if device is not None else head
