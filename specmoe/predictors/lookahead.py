"""Hidden-state lookahead: layer l+h's own normalisation and router applied to what is known
after layer l. Training-free (the router weights are copied from the model); the strongest
published prefetchers build on this signal.
"""

from __future__ import annotations

import torch

from specmoe.errors import InputError
from specmoe.predictors.base import ExpertPredictor
from specmoe.predictors.data import Context, TraceDataset


def rms_normalise(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x = x.float()
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight.float()


def extract_routers(model_id: str, stack: str) -> dict[str, torch.Tensor]:
    """Per MoE layer of ``stack``: pre-router RMSNorm weight and eps, router weight and bias,
    read from a model loaded without its routed experts (a model larger than memory too)."""
    from specmoe.models.offloaded import load_offloaded

    loaded = load_offloaded(model_id, dtype="float32", progress=False).loaded
    norms, weights, biases, eps = [], [], [], []
    for layer in loaded.layers_of(stack):
        norm = loaded.adapter.pre_router_norm(layer)
        norm_weight = next(p for p in norm.parameters() if p.dim() == 1).detach().float()
        layer_eps = float(getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6)))
        probe = torch.randn(4, norm_weight.shape[0])
        with torch.no_grad():
            if not torch.allclose(norm(probe).float(), rms_normalise(probe, norm_weight, layer_eps), atol=1e-4):
                raise InputError(
                    f"lookahead supports RMSNorm-normalised routers; {layer.name} uses {type(norm).__name__}"
                )
        weight, bias = loaded.adapter.router_weights(layer)
        norms.append(norm_weight)
        weights.append(weight.float())
        biases.append(bias.detach().float() if bias is not None else torch.zeros(weight.shape[0]))
        eps.append(layer_eps)
    return {
        "norm": torch.stack(norms),
        "router": torch.stack(weights),
        "bias": torch.stack(biases),
        "eps": torch.tensor(eps),
    }


def lookahead_logits(
    routers: dict[str, torch.Tensor], state: torch.Tensor, source: int, target: int, hidden: str
) -> torch.Tensor:
    """Layer ``target``'s router logits (N, E) for ``hidden`` states (N, D) taken at ``source``,
    with the tensors of :func:`extract_routers`."""
    state = state.float()
    if hidden == "router_input":  # undo layer ``source``'s norm weight, keep the unit RMS
        state = state / routers["norm"][source].clamp(min=1e-6)
    x = rms_normalise(state, routers["norm"][target], float(routers["eps"][target]))
    return x @ routers["router"][target].T + routers["bias"][target]


class RouterLookaheadPredictor(ExpertPredictor):
    """Training-free: score layer l+h's experts with its router applied to layer l's state.

    ``hidden="residual_out"``: layer l+h's RMSNorm then router on the residual stream leaving
    layer l (needs traces collected with ``--save-residuals``). ``hidden="router_input"``:
    layer l's router input with layer l's norm weight divided out and layer l+h's applied.
    """

    name = "lookahead"

    def __init__(self, *, horizons: int = 3, hidden: str = "residual_out", model: str | None = None):
        self.horizons = horizons
        self.hidden = hidden
        self.model = model

    @property
    def needs_hidden(self) -> str:  # type: ignore[override]
        return self.hidden

    def fit(self, train: TraceDataset, val: TraceDataset | None = None):
        if self.hidden not in ("residual_out", "router_input"):
            raise InputError(f"hidden must be residual_out or router_input, got {self.hidden!r}")
        self.routers_ = extract_routers(self.model or train.store.manifest.model.id, train.stack)
        self.num_layers_, self.num_experts_ = self.routers_["router"].shape[:2]
        self.routers_["temperature"] = self._calibrate(train)
        return self

    def _calibrate(self, train: TraceDataset, max_batches: int = 2) -> torch.Tensor:
        """One softmax temperature per horizon, chosen on train data to maximise the likelihood
        of the true experts. It leaves the ranking (and so every metric here) unchanged, but makes
        the probabilities usable by mixtures such as ``combo``."""
        grid = torch.tensor([0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0])
        loglik = torch.zeros(self.horizons, len(grid))
        for i, batch in enumerate(train.iter_batches(2048)):
            if i >= max_batches:
                break
            for layer in range(train.num_layers - 1):
                context = batch.context(layer)
                for h in range(1, self.horizons + 1):
                    if layer + h >= self.num_layers_:
                        break
                    logits = self.router_logits(context.hidden[:, -1], layer, layer + h)
                    true = batch.expert_ids[:, layer + h]
                    ok = true >= 0
                    for j, t in enumerate(grid):
                        logp = torch.log_softmax(logits / t, dim=-1).gather(1, true.clamp_min(0))
                        loglik[h - 1, j] += (logp * ok).sum()
        return grid[loglik.argmax(1)]

    def predict_proba(self, context: Context) -> torch.Tensor:
        if context.hidden is None:
            raise InputError(f"the lookahead predictor needs {self.hidden} states in the traces")
        state = context.hidden[:, -1]  # (N, D), layer l
        out = torch.full((len(context), self.horizons, self.num_experts_), 1.0 / self.num_experts_)
        for h in range(1, self.horizons + 1):
            if context.layer + h >= self.num_layers_:
                break
            logits = self.router_logits(state, context.layer, context.layer + h)
            out[:, h - 1] = torch.softmax(logits / self.routers_["temperature"][h - 1], dim=-1)
        return out

    def router_logits(self, state: torch.Tensor, source: int, target: int) -> torch.Tensor:
        """Layer ``target``'s router logits (N, E) for hidden states (N, D) taken at ``source``."""
        return lookahead_logits(self.routers_, state, source, target, self.hidden)

    def fitted_meta(self):
        return {"num_layers": self.num_layers_, "num_experts": self.num_experts_} if hasattr(self, "routers_") else {}

    def state_tensors(self):
        return dict(self.routers_)

    def load_state_tensors(self, tensors, meta):
        self.routers_ = dict(tensors)
        self.num_layers_, self.num_experts_ = meta["num_layers"], meta["num_experts"]

    def num_parameters(self) -> int:
        return 0  # copied from the model, nothing learned
