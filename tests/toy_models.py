"""A toy encoder for gradient-cache tests: small, with dropout and optional checkpointing."""
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

D_IN, D_OUT = 12, 8


class ToyEncoder(nn.Module):
    def __init__(self, dropout: float = 0.1, checkpointing: str = "off", hidden: int = 16):
        super().__init__()
        self.block = nn.Sequential(nn.Linear(D_IN, hidden), nn.GELU(), nn.Dropout(dropout),
                                   nn.Linear(hidden, hidden), nn.Tanh())
        self.head = nn.Linear(hidden, D_OUT)
        self.checkpointing = checkpointing

    def forward(self, x: torch.Tensor, fail: bool = False) -> torch.Tensor:
        if fail:
            raise RuntimeError("injected encoder failure")
        if self.checkpointing == "off" or not torch.is_grad_enabled():
            h = self.block(x)
        else:
            h = checkpoint(self.block, x, use_reentrant=self.checkpointing == "reentrant")
        return F.normalize(self.head(h), dim=-1)
