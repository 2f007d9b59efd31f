"""Run a Hugging Face MoE model with its routed experts in a slow tier and a byte-budgeted
fast-tier cache, prefetching in the background what a predictor (or a recorded trace)
expects the next layers to need.

Each MoE block's ``experts`` submodule is swapped, on this model instance only, for an
:class:`OffloadedExperts` that fetches the experts a call needs and runs the original
module's own forward on them through ``torch.func.functional_call`` — the same code and
arithmetic as the resident model, so outputs match it for any cache size. A misprediction
costs a wasted read, never a wrong result.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.func import functional_call

from specmoe.errors import InputError
from specmoe.models.loading import LoadedModel
from specmoe.offload.cache import future_uses
from specmoe.offload.expert_files import ExpertFiles
from specmoe.offload.fast_tier import (
    EVICTIONS,
    FastTier,
    Prefetcher,
    RuntimeStats,
    fetch_expert,
    prefetch_choice,
)
from specmoe.offload.tiers import HostExperts, Key, Transfer


@dataclass
class _LayerBinding:
    layer_idx: int
    names: list[str]
    """Names of the (E, ...) expert parameters inside the experts module."""


class OffloadedExperts(nn.Module):
    """Stands in for one MoE block's ``experts`` module; the original runs on fetched weights."""

    def __init__(self, original: nn.Module, binding: _LayerBinding, runtime: OffloadRuntime):
        super().__init__()
        self.binding = binding
        self._original = (original,)  # a tuple: not a submodule, so its (emptied) params are not ours
        self._runtime = (runtime,)

    def forward(self, hidden_states, *args, **kwargs):
        runtime, original, binding = self._runtime[0], self._original[0], self.binding
        layer = runtime.layers[binding.layer_idx]
        ids, weights = runtime.loaded.adapter.selection_from_call(layer, (hidden_states, *args), kwargs)
        runtime.on_routing(binding.layer_idx, ids, weights)
        needed = sorted({int(e) for e in ids.reshape(-1).tolist() if e >= 0})
        tensors = runtime.fetch(binding.layer_idx, needed)
        # The experts run on a compact stack of just the needed experts; ids are remapped to it.
        params = {name: torch.stack([tensors[e][i] for e in needed]) for i, name in enumerate(binding.names)}
        device = hidden_states.device
        remap = torch.full((runtime.num_experts + 1,), runtime.num_experts, dtype=torch.long, device=device)
        remap[torch.tensor(needed, dtype=torch.long, device=device)] = torch.arange(len(needed), device=device)
        if "top_k_index" in kwargs:
            kwargs = {**kwargs, "top_k_index": remap[kwargs["top_k_index"]]}
        else:
            args = (remap[args[0]],) + tuple(args[1:])
        out = functional_call(original, params, (hidden_states, *args), kwargs, strict=False)
        runtime.release(binding.layer_idx, needed)
        return out


class OffloadRuntime:
    """Offloaded execution of ``loaded`` (modified in place).

    Args:
        loaded: a model from :func:`specmoe.models.loading.load_model` (or ``wrap_model``).
        budget_bytes: fast-tier capacity; never exceeded.
        device: where the model runs and the fast tier lives (``cpu`` or ``cuda[:i]``).
        slow_tier: ``disk`` (expert files in ``experts_dir``, read with the page cache
            bypassed) or ``host`` (host memory, pinned when ``device`` is a GPU). Default:
            disk on CPU, host on a GPU.
        predictor: an :class:`ExpertPredictor` over routing (prefetch after each layer's routing).
        lookahead, budget, threshold: prefetch layers l+1..l+lookahead, at most ``budget``
            experts per layer, each with probability >= ``threshold``.
        oracle: recorded routing ``oracle[step][layer] -> list of experts`` to prefetch instead.
        eviction: ``lru``, ``lfu`` or ``belady`` (needs ``oracle``: the future it evicts by).
    """

    def __init__(
        self,
        loaded: LoadedModel,
        budget_bytes: int,
        *,
        device: str | torch.device = "cpu",
        slow_tier: str | None = None,
        experts_dir: str | Path | None = None,
        predictor=None,
        lookahead: int = 1,
        budget: int | None = None,
        threshold: float = 0.0,
        oracle=None,
        eviction: str = "lru",
    ):
        if len(loaded.stacks) != 1:
            raise InputError(
                "the offload runtime supports single-stack (decoder-only) models; "
                f"{loaded.model_id} has stacks {list(loaded.stacks)}"
            )
        meta = predictor.fitted_meta() if predictor is not None else {}
        if meta and (meta.get("num_layers"), meta.get("num_experts")) != (len(loaded.layers), loaded.num_experts):
            raise InputError(
                f"predictor {predictor.name} was fitted for {meta.get('num_layers')} MoE layers x "
                f"{meta.get('num_experts')} experts; {loaded.model_id} has {len(loaded.layers)} x "
                f"{loaded.num_experts}: train it on this model's traces"
            )
        if predictor is not None and (predictor.needs_hidden or predictor.previous_tokens):
            raise InputError(
                f"runtime prefetch uses routing-only predictors; {predictor.name} needs hidden states or earlier tokens"
            )
        if eviction not in EVICTIONS:
            raise InputError(f"eviction must be one of {', '.join(EVICTIONS)}, got {eviction!r}")
        if eviction == "belady" and oracle is None:
            raise InputError("Belady eviction needs the future routing: pass oracle=")
        self.device = _fast_device(device)
        slow_tier = slow_tier or ("disk" if self.device.type == "cpu" else "host")
        if slow_tier not in ("disk", "host"):
            raise InputError(f"slow_tier must be disk or host, got {slow_tier!r}")
        if slow_tier == "disk" and experts_dir is None:
            raise InputError("the disk slow tier needs experts_dir: where to write the expert files")
        self.loaded = loaded
        self.layers = loaded.layers
        self.num_experts, self.top_k = loaded.num_experts, loaded.top_k
        self.stats = RuntimeStats()
        self.predictor, self.lookahead, self.threshold, self.oracle = predictor, lookahead, threshold, oracle
        self.budget = budget or 2 * loaded.top_k
        self._bindings = [self._binding(layer) for layer in self.layers]
        experts = self._expert_tensors()
        if slow_tier == "disk":
            slow = ExpertFiles.write(Path(experts_dir), experts)
        else:
            slow = HostExperts(experts, pin=self.device.type == "cuda")
        self.transfer = Transfer(slow, self.device)
        largest = max(slow.expert_nbytes(i) for i in range(len(self.layers)))
        if budget_bytes < largest:
            raise InputError(f"fast-tier budget {budget_bytes} B is smaller than one expert ({largest} B)")
        future = future_uses(oracle, len(self.layers)) if eviction == "belady" else None
        self.tier = FastTier(budget_bytes, self.stats, eviction, future)
        self.prefetcher = Prefetcher(self.transfer, self.tier, self.stats) if (predictor or oracle) else None
        self.loaded.model.config._experts_implementation = "eager"
        self._swap_in()
        self.loaded.model.to(self.device)  # everything but the routed experts is resident
        self.step = 0
        self.routing_log: list[list[list[int]]] = []
        """The experts each forward call needed, per layer: pass it as ``oracle`` to a later
        runtime that decodes the same prompt."""
        self._history: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._token_ids = torch.zeros(0, dtype=torch.long)
        self._input_hook = loaded.model.register_forward_pre_hook(self._on_input, with_kwargs=True)

    def _on_input(self, _module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is not None:
            self._token_ids = ids.reshape(-1).cpu()

    # --- setup ------------------------------------------------------------------------
    def _binding(self, layer) -> _LayerBinding:
        experts = getattr(layer.block, "experts", None)
        names = (
            [n for n, p in experts.named_parameters(recurse=False) if p.dim() >= 2 and p.shape[0] == self.num_experts]
            if experts is not None
            else []
        )
        if not names or any(p.dim() >= 2 for n, p in experts.named_parameters() if n not in names):
            raise InputError(
                f"the offload runtime supports experts stored as (num_experts, ...) tensors "
                f"(Mixtral, Qwen-MoE, OLMoE, DeepSeek, gpt-oss, PhiMoE, GraniteMoE); "
                f"{self.loaded.model_type} is not supported yet"
            )
        return _LayerBinding(layer.layer_idx, names)

    def _expert_tensors(self) -> dict[int, list[list[torch.Tensor]]]:
        per_layer = {}
        for layer, binding in zip(self.layers, self._bindings):
            params = dict(layer.block.experts.named_parameters(recurse=False))
            per_layer[layer.layer_idx] = [[params[n][e] for n in binding.names] for e in range(self.num_experts)]
        return per_layer

    def _swap_in(self) -> None:
        for layer, binding in zip(self.layers, self._bindings):
            original = layer.block.experts
            for name in binding.names:  # free the resident copies: the weights now live in the slow tier
                dtype = getattr(original, name).dtype
                setattr(original, name, nn.Parameter(torch.empty(0, dtype=dtype), requires_grad=False))
            original.to(self.device)  # not a submodule of the wrapper, so model.to() would miss what it keeps
            layer.block.experts = OffloadedExperts(original, binding, self)

    # --- per call ---------------------------------------------------------------------
    def fetch(self, layer: int, experts: list[int]) -> dict[int, list[torch.Tensor]]:
        if layer == 0:
            self.routing_log.append([])
        self.routing_log[-1].append(list(experts))
        keys = [(layer, e) for e in experts]
        with self.tier.lock:
            fits = len(keys) * self.transfer.expert_nbytes(layer) <= self.tier.budget
            self.tier.pinned = set(keys) if fits else set()  # a layer wider than the tier streams through it
            self.tier.position = self.step * len(self.layers) + layer
        return {key[1]: fetch_expert(self.tier, self.prefetcher, self.transfer, self.stats, key) for key in keys}

    def release(self, layer: int, experts: list[int]) -> None:
        with self.tier.lock:
            self.tier.pinned = set()
        if layer == len(self.layers) - 1:
            self.step += 1

    def on_routing(self, layer: int, ids: torch.Tensor, weights: torch.Tensor) -> None:
        """Layer ``layer``'s routing is known: queue prefetches for the next layers."""
        if layer == 0:
            self._history = []
        self._history.append((ids.cpu(), weights.cpu()))
        if self.prefetcher is None:
            return
        wanted: list[Key] = []
        for h in range(1, self.lookahead + 1):
            target = layer + h
            if target >= len(self.layers):
                break
            if self.oracle is not None:
                steps = self.oracle
                if self.step < len(steps):
                    wanted += [(target, e) for e in steps[self.step][target]]
                continue
            chosen = prefetch_choice(self._predict(layer)[:, h - 1], self.budget, self.threshold)
            wanted += [(target, e) for e in chosen]
        self.prefetcher.request(wanted)

    def _predict(self, layer: int) -> torch.Tensor:
        from specmoe.predictors.data import IGNORE, Context

        ids = torch.stack([h[0] for h in self._history], 1)  # (N, l+1, k)
        weights = torch.stack([h[1] for h in self._history], 1)
        n = ids.shape[0]
        tokens = self._token_ids if len(self._token_ids) == n else torch.zeros(n, dtype=torch.long)
        context = Context(
            layer,
            ids,
            weights,
            tokens,
            torch.full((n, 0, len(self.layers), self.top_k), IGNORE),
            None,
            len(self.layers),
            self.num_experts,
        )
        return self.predictor.predict_proba(context)

    def close(self) -> None:
        self._input_hook.remove()
        if self.prefetcher is not None:
            self.prefetcher.close()
        self.transfer.close()


def _fast_device(device) -> torch.device:
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"device {device} was asked for, but this machine has no CUDA GPU")
    if device.type not in ("cpu", "cuda"):
        raise InputError(f"the offload runtime runs on cpu or cuda, got {device}")
    return device
