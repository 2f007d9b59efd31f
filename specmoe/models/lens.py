"""The logit lens: a causal LM's final norm and unembedding, applied to a residual stream taken
before the last layer, to guess the next token early. Used by next-token prefetch
(``specmoe.offload.live.next_token``) and by the cross-token predictors (``specmoe.predictors``),
which keep the lens as tensors so that it is saved with them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from specmoe.errors import InputError

FINAL_NORM_NAMES = ("norm", "final_layernorm", "ln_f", "final_layer_norm")


class _RMSNorm(nn.Module):
    """RMSNorm from a weight and an epsilon (what a saved lens holds)."""

    def __init__(self, weight: torch.Tensor, eps: float):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.rms_norm(x.float(), (x.shape[-1],), self.weight.float(), self.eps)


@dataclass
class LogitLens:
    """The model's final norm and unembedding, applied to a residual stream taken early."""

    norm: nn.Module
    head: nn.Module

    @classmethod
    def of(cls, model: nn.Module) -> LogitLens:
        """The lens of a Hugging Face causal LM (the modules are shared, not copied)."""
        if getattr(model.config, "is_encoder_decoder", False):
            raise InputError("next-token guessing needs a decoder-only model; this one is encoder-decoder")
        head = model.get_output_embeddings()
        decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
        norm = next(
            (getattr(decoder, n) for n in FINAL_NORM_NAMES if isinstance(getattr(decoder, n, None), nn.Module)), None
        )
        if head is None or norm is None:
            raise InputError(
                f"{type(model).__name__}: cannot find its final norm ({', '.join(FINAL_NORM_NAMES)} on the "
                "decoder) and output embeddings, which next-token guessing applies to a late layer"
            )
        return cls(norm, head)

    def guess(self, residual: torch.Tensor, candidates: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """The ``candidates`` likeliest next tokens for each row of ``residual`` (N, D), and
        their probabilities renormalised over the candidates, both (N, candidates)."""
        param = next(self.head.parameters())
        with torch.no_grad():
            logits = self.head(self.norm(residual.to(param.device, param.dtype))).float()
            top = logits.topk(candidates, dim=-1)
            probs = torch.softmax(top.values, dim=-1)  # softmax over the candidates' logits
        return top.indices.cpu().numpy(), probs.cpu().numpy()

    def tensors(self) -> dict[str, torch.Tensor]:
        """The lens as tensors (final RMSNorm weight and epsilon, unembedding), for saving;
        :meth:`from_tensors` rebuilds it."""
        weight = next((p for p in self.norm.parameters() if p.dim() == 1), None)
        eps = float(getattr(self.norm, "variance_epsilon", getattr(self.norm, "eps", 1e-6)))
        if weight is None or list(self.head.parameters())[1:]:
            raise InputError("the logit lens can be saved for an RMSNorm and an unembedding without bias only")
        probe = torch.randn(4, weight.shape[0])
        with torch.no_grad():
            if not torch.allclose(self.norm(probe).float(), _RMSNorm(weight.detach().float(), eps)(probe), atol=1e-4):
                raise InputError(f"the logit lens can be saved for an RMSNorm; this final norm is {type(self.norm)}")
        return {
            "lens_norm": weight.detach().float().clone(),
            "lens_eps": torch.tensor([eps]),
            "lens_head": next(self.head.parameters()).detach().float().clone(),
        }

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor]) -> LogitLens:
        head = nn.Linear(tensors["lens_head"].shape[1], tensors["lens_head"].shape[0], bias=False)
        head.weight = nn.Parameter(tensors["lens_head"], requires_grad=False)
        return cls(_RMSNorm(tensors["lens_norm"], float(tensors["lens_eps"][0])), head)
