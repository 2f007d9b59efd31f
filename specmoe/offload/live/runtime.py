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

import functools
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.func import functional_call

from specmoe.errors import InputError
from specmoe.models.expert_layout import ExpertLayout, discover_layout, empty_parameters
from specmoe.models.loading import LoadedModel
from specmoe.offload.eviction import future_uses
from specmoe.offload.live.expert_files import ExpertFiles
from specmoe.offload.live.next_token import LogitLens, NextTokenPlanner
from specmoe.offload.live.planner import PrefetchPlanner
from specmoe.offload.live.session import DecodingSession
from specmoe.offload.live.tiers import HostCache, HostExperts, SlowTier, Transfer
from specmoe.offload.policy import EventLog, Forecast, LinkModel, PrefetchSettings, oracle_requests, policy_named
from specmoe.offload.settings import NextTokenSettings, TierSize
from specmoe.predictors.calibration import Calibration


class OffloadedExperts(nn.Module):
    """Stands in for one MoE block's ``experts`` module; the original runs on fetched weights."""

    def __init__(self, original: nn.Module, layer: int, layout: ExpertLayout, runtime: OffloadRuntime):
        super().__init__()
        self.layer, self.layout = layer, layout
        self._original = (original,)  # a tuple: not a submodule, so its (emptied) params are not ours
        self._runtime = (runtime,)

    def forward(self, hidden_states, *args, **kwargs):
        runtime, original, layout = self._runtime[0], self._original[0], self.layout
        moe_layer = runtime.layers[self.layer]
        ids, weights = runtime.loaded.adapter.selection_from_call(moe_layer, (hidden_states, *args), kwargs)
        runtime.on_routing(self.layer, ids, weights)
        needed = sorted({int(e) for e in ids.reshape(-1).tolist() if e >= 0})
        keys = runtime.begin_layer(self.layer, needed)
        if not layout.remaps_ids:  # experts of their own: the module runs just the needed ones
            params = layout.parameters_for({e: runtime.session.fetch(key) for e, key in zip(needed, keys)})
            out = functional_call(original, params, (hidden_states, *args), kwargs, strict=False)
        elif not runtime.loaded.adapter.experts_skip_padding_id:  # on a compact stack of the needed ones
            params = layout.parameters_for({e: runtime.session.fetch(key) for e, key in zip(needed, keys)})
            remap = layout.remap(needed, hidden_states.device)
            args = (remap[args[0]],) + tuple(args[1:]) if args else args
            out = functional_call(original, params, (hidden_states, *args), kwargs, strict=False)
        else:  # one expert at a time, as it arrives: no copy of the layer's experts into one stack
            out = None
            for e, key in zip(needed, keys):
                params = layout.parameters_for({e: runtime.session.fetch(key)})
                part = functional_call(original, params, (hidden_states, *self._only(e, args)), self._only(e, kwargs))
                out = part if out is None else out.add_(part)
            if out is None:  # no token was routed (all dropped)
                out = functional_call(original, {}, (hidden_states, *args), kwargs, strict=False)
        runtime.release(self.layer)
        return out

    def _only(self, expert: int, args):
        """The call's arguments with expert ids remapped: ``expert`` to 0 (the one-expert
        stack it runs on), every other id to the padding id the module skips. Outputs of the
        experts' calls add up to the one call's, in the same order of additions."""
        remap = self.layout.remap([expert], self._device(args))
        if isinstance(args, dict):
            return {**args, "top_k_index": remap[args["top_k_index"]]} if "top_k_index" in args else args
        return (remap[args[0]],) + tuple(args[1:]) if args else args

    @staticmethod
    def _device(args):
        values = args.values() if isinstance(args, dict) else args
        return next((a.device for a in values if isinstance(a, torch.Tensor)), "cpu")


class OffloadRuntime:
    """Offloaded execution of ``loaded`` (modified in place).

    Layers are numbered globally, in execution order across stacks (an encoder-decoder's
    encoder layers first); a new step, of the routing log and of the oracle, starts whenever
    the first MoE layer of a stack runs. Decode positions are ``step * L + layer`` over all L
    MoE layers, as in the policy core.

    Args:
        loaded: a model from :func:`specmoe.models.loading.load_model` (or ``wrap_model``).
        budget_bytes: fast-tier capacity; never exceeded.
        device: where the model runs and the fast tier lives (``cpu`` or ``cuda[:i]``).
        experts: where the routed experts are read from: an expert store or the checkpoint
            itself (see :mod:`.expert_store`), for a model loaded without its experts
            (:func:`.loading.load_offloaded`). Without it, the model's resident experts are
            moved to ``slow_tier``: ``disk`` (expert files written to ``experts_dir``, read
            with the page cache bypassed) or ``host`` (host memory, pinned when ``device``
            is a GPU); default disk on CPU, host on a GPU.
        predictor: an :class:`ExpertPredictor`; it plans after each layer's routing, or, if it
            reads residual outputs, after the layer has run (router inputs and residual
            outputs of the current step are kept by hooks for predictors that read them).
        predictor_stack: the stack the predictor was fitted on (default: the first, which is
            what ``specmoe train`` fits on); the other stack runs without prefetch.
        policy: a name of :data:`~specmoe.offload.policy.POLICIES` (not a next-token one:
            see ``next_token``). Default: ``prefetch`` with a predictor, ``oracle`` (or
            ``oracle-prefetch``, without ``belady`` eviction) with an oracle, else the cache
            of ``prefetch.eviction``.
        prefetch: how to prefetch, and how a prefetching policy evicts
            (:class:`~specmoe.offload.policy.PrefetchSettings`).
        oracle: a ``routing_log`` recorded by an earlier run of the same prompt, prefetched
            ``prefetch.oracle_reach`` positions ahead instead of predicting; with ``belady``
            eviction it is also the future evicted by.
        host_cache_bytes: on a GPU, the middle tier of three: this many bytes of experts kept
            in pinned host memory between the slow tier and the GPU's fast tier
            (:class:`~.tiers.HostCache`; on a CPU the same code runs as a stand-in).
        layouts: the experts' layouts, when the model's experts were already taken out (a
            second runtime on a model a closed one ran).
        next_token: also prefetch the next token's first layers from a guess of that token
            (see :mod:`specmoe.offload.live.next_token`); decoder-only models.
            ``next_token_table``: the token table to look the guess up in (default:
            ``predictor``, which must then be one).
        planning: where prefetch work runs (:data:`~specmoe.offload.settings.PLANNING`).
        calibration: the predictor's (:mod:`specmoe.predictors.calibration`), for policies
            that weigh reads by probability; ``link``: the times they price reads at (default:
            learnt as the model decodes, the compute a read costs the layers beside it too).
        log: a list to record every decision in (the parity tests).
    """

    def __init__(
        self,
        loaded: LoadedModel,
        budget_bytes: int,
        *,
        device: str | torch.device = "cpu",
        experts: SlowTier | None = None,
        slow_tier: str | None = None,
        experts_dir: str | Path | None = None,
        predictor=None,
        predictor_stack: str | None = None,
        policy: str | None = None,
        prefetch: PrefetchSettings | None = None,
        oracle=None,
        next_token: NextTokenSettings | None = None,
        next_token_table=None,
        planning: str = "background",
        host_cache_bytes: int | None = None,
        layouts: list[ExpertLayout] | None = None,
        calibration: Calibration | None = None,
        link: LinkModel | None = None,
        log: EventLog | None = None,
    ):
        self.predictor_stack = predictor_stack or next(iter(loaded.stacks))
        if self.predictor_stack not in loaded.stacks:
            raise InputError(f"predictor_stack must be one of {list(loaded.stacks)}, got {predictor_stack!r}")
        _check_predictor(predictor, loaded, self.predictor_stack)
        prefetch = prefetch or PrefetchSettings()
        rule = policy_named(policy or _default_policy(predictor, oracle, prefetch))
        if rule.next_token:
            raise InputError("next-token prefetch is asked for with next_token=, beside the policy prefetch")
        if rule.recurrence and len(loaded.stacks) > 1:
            raise InputError(
                f"policy {rule.name!r} follows each sequence's tokens, which an encoder-decoder's two stacks "
                "do not share: run it on a decoder-only model, or use cost-aware+next-use"
            )
        if rule.prefetch == "predictor" and predictor is None:
            raise InputError(f"policy {rule.name} needs a predictor")
        if rule.prefetch == "oracle" and oracle is None:
            raise InputError(f"policy {rule.name} needs an oracle: the routing log of an earlier run")
        if rule.eviction_for(prefetch) == "belady" and oracle is None:
            raise InputError("Belady eviction needs the future routing: pass oracle=")
        self.device = _fast_device(device)
        slow_tier = slow_tier or ("disk" if self.device.type == "cpu" else "host")
        if slow_tier not in ("disk", "host"):
            raise InputError(f"slow_tier must be disk or host, got {slow_tier!r}")
        if experts is None and slow_tier == "disk" and experts_dir is None:
            raise InputError("the disk slow tier needs experts_dir: where to write the expert files")
        self.loaded = loaded
        self.layers = loaded.layers
        self.num_experts, self.top_k = loaded.num_experts, loaded.top_k
        self._stack_range = _stack_ranges(loaded.stacks)
        self.prefetch = rule.resolve(prefetch, top_k=loaded.top_k, num_layers=len(self.layers))
        self.predictor = predictor if rule.prefetch == "predictor" else None
        self._by_value = rule.selection != "budget"
        self.oracle = oracle if rule.prefetch == "oracle" else None
        self.next_token = None
        self.guess_log: list[tuple[int, list[int]]] = []
        """(step, guessed next token per sequence) of every guess made (on the decoding thread)."""
        self._awaiting_output = None
        if next_token is not None:
            if predictor is None:
                raise InputError("next-token prefetch runs beside a predictor's: pass predictor=")
            _check_predictor(next_token_table, loaded, self.predictor_stack)
            self.next_token = NextTokenPlanner(
                LogitLens.of(loaded.model),
                next_token_table or predictor,
                next_token,
                loaded.stacks[self.predictor_stack],
                self.prefetch,
                calibration,
            )
        self._layouts = layouts or [discover_layout(loaded.adapter, layer, self.num_experts) for layer in self.layers]
        slow = experts if experts is not None else self._move_experts(slow_tier, experts_dir)
        sizes = [slow.expert_nbytes(g) for g in range(len(self.layers))]
        if budget_bytes < max(sizes):
            raise InputError(f"fast-tier budget {budget_bytes} B is smaller than one expert ({max(sizes)} B)")
        if host_cache_bytes is not None:
            if host_cache_bytes < max(sizes):
                raise InputError(f"a host cache of {host_cache_bytes} B is smaller than one expert ({max(sizes)} B)")
            slow = HostCache(slow, host_cache_bytes, pin=self.device.type == "cuda")
        self.transfer = Transfer(slow, self.device)
        # Reads stay in host buffers only when the fast tier is host memory; on a GPU they are
        # copied out at once, and a read in flight per thread is all that is held.
        held = min(budget_bytes // min(sizes), len(self.layers) * self.num_experts) if self.device.type == "cpu" else 0
        slow.reserve_buffers(held + 2)
        if link is None and rule.selection == "value":  # no probe: what a read costs the layers is learnt too
            link = LinkModel(1.0, 1.0, learn=True, learn_compute_cost=True)
        self.session = DecodingSession(
            self.transfer,
            budget_bytes,
            num_layers=len(self.layers),
            eviction=rule.eviction_for(self.prefetch),
            prefetching=rule.prefetch != "none",
            keeps_experts=rule.keeps_experts,
            planning=planning,
            future_uses=future_uses(oracle, len(self.layers)) if rule.eviction_for(self.prefetch) == "belady" else None,
            log=log,
            rule=rule,
            link=link,
        )
        self.stats = self.session.stats
        self.planner = (
            PrefetchPlanner(
                self.predictor, loaded.stacks[self.predictor_stack], self.num_experts, self.prefetch, rule, calibration
            )
            if self.predictor is not None
            else None
        )
        self._hooks = self._state_hooks(getattr(self.predictor, "needs_hidden", None))
        self.loaded.model.config._experts_implementation = "eager"
        self._swap_in()
        self.loaded.model.to(self.device)  # everything but the routed experts is resident
        self.step = -1
        self.routing_log: list[list[list[int]]] = []
        """Per step, per global layer, the experts it needed (empty for layers of another
        stack): pass it as ``oracle`` to a later runtime that decodes the same prompt."""
        self._history: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._token_ids = torch.zeros(0, dtype=torch.long)
        self._token_shape: tuple[int, ...] = (0,)
        self._recurrence = rule.recurrence
        self._step_tokens = 1
        """Tokens per sequence in the step under way (a prompt's length, then 1)."""
        # Each stack embeds its own tokens just before its layers run (an encoder-decoder has an
        # embedding module per stack, tied to one weight): the last embedded ids are the ones routed.
        vocab = loaded.model.get_input_embeddings().num_embeddings
        self._input_hooks = [
            module.register_forward_pre_hook(self._on_embed)
            for module in loaded.model.modules()
            if isinstance(module, nn.Embedding) and module.num_embeddings == vocab
        ]

    @classmethod
    def from_checkpoint(
        cls,
        model: str,
        fast_tier: TierSize,
        *,
        store: Path | None = None,
        expert_source: str = "store",
        dtype: str | None = None,
        trust_remote_code: bool = False,
        host_cache: TierSize | None = None,
        log=print,
        **options,
    ) -> OffloadRuntime:
        """A runtime for checkpoint ``model`` that never holds its routed experts: everything
        else loaded (:func:`~specmoe.models.offloaded.load_offloaded`), the experts read from
        the expert store (written first if there is none: ``expert_source="store"``) or
        straight from the checkpoint (``"checkpoint"``), ``fast_tier`` of them in memory.
        ``host_cache``: the middle tier of a GPU run (see the constructor). ``options``: as for
        the constructor. The model is ``runtime.loaded.model``."""
        from specmoe.models.offloaded import load_offloaded
        from specmoe.offload.live.expert_store import CheckpointExperts, prepare_store

        if expert_source not in ("store", "checkpoint"):
            raise InputError(f"--expert-source must be store or checkpoint, got {expert_source!r}")
        offloaded = load_offloaded(model, dtype=dtype, trust_remote_code=trust_remote_code)
        sizes = [offloaded.expert_nbytes(g) for g in range(len(offloaded.loaded.layers))]
        budget = fast_tier.bytes_for(sum(sizes) * offloaded.loaded.num_experts, max(sizes))  # one rule for every tier
        experts = prepare_store(offloaded, store, log=log) if expert_source == "store" else CheckpointExperts(offloaded)
        total = sum(sizes) * offloaded.loaded.num_experts
        if host_cache is not None:
            options["host_cache_bytes"] = host_cache.bytes_for(total, max(sizes))
        runtime = cls(offloaded.loaded, budget, experts=experts, layouts=offloaded.layouts, **options)
        runtime.offloaded = offloaded
        return runtime

    def _move_experts(self, slow_tier: str, experts_dir) -> SlowTier:
        """The resident model's experts, written to expert files or copied to host memory."""
        resident = {
            g: [self.loaded.adapter.expert_parameters(layer, e) for e in range(self.num_experts)]
            for g, layer in enumerate(self.layers)
        }
        if slow_tier == "disk":
            return ExpertFiles.write(Path(experts_dir), resident)
        return HostExperts(resident, pin=self.device.type == "cuda")

    def _on_embed(self, _module, args):
        self._token_shape = tuple(args[0].shape)
        self._token_ids = args[0].reshape(-1).cpu()

    def _swap_in(self) -> None:
        for g, (layer, layout) in enumerate(zip(self.layers, self._layouts)):
            original = getattr(layer.block, self.loaded.adapter.experts_attr)
            empty_parameters(original, {name for names in layout.names for name in names})
            original.to(self.device)  # not a submodule of the wrapper, so model.to() would miss what it keeps
            setattr(layer.block, self.loaded.adapter.experts_attr, OffloadedExperts(original, g, layout, self))

    def results(self) -> dict:
        """The run's counters (see :class:`~specmoe.offload.live.fast_tier.RuntimeStats`)."""
        host = self.transfer.slow.stats() if isinstance(self.transfer.slow, HostCache) else {}
        return self.session.results() | (self.planner.stats() if self.planner else {}) | host

    # --- per call ---------------------------------------------------------------------
    def begin_layer(self, layer: int, experts: list[int]) -> list:
        """Layer ``layer`` needs ``experts``: its steps begin (see :class:`DecodingSession`)."""
        self.routing_log[self.step][layer] = list(experts)
        keys = self.session.begin_layer(self.step, layer, experts)
        if self.oracle is not None:
            self.session.request(self._oracle_requests(layer))
        return keys

    def release(self, layer: int) -> None:
        self.session.finish_layer(self.step, layer)

    def on_routing(self, layer: int, ids: torch.Tensor, weights: torch.Tensor) -> None:
        """Layer ``layer``'s routing is known: plan prefetches for the next layers of its stack."""
        first, end = self._stack_range[layer]
        if layer == first:
            if self._recurrence:
                self._follow_tokens()
            self.step += 1
            self.routing_log.append([[] for _ in self.layers])
            self._history = []
            if self._recurrence:
                tokens = self._token_ids.reshape(-1, self._token_shape[-1]).numpy()  # (B, T)
                self._step_tokens = tokens.shape[1]
                earlier = tokens[:, :-1] if tokens.shape[1] > 1 else None  # a prompt's
                self.session.begin_token(self.step, tokens[:, -1], np.arange(len(tokens)), earlier)
        self._history.append((ids.cpu(), weights.cpu()))
        if self.planner is None or self.layers[layer].stack != self.predictor_stack:
            return
        if layer + 1 < end or self._recurrence:  # planned on the prefetch thread, from this layer's routing
            # history (at the last layer only the recurrence's reads into the next token)
            plan = functools.partial(self._plan, self.step, layer - first, first, list(self._history), self._token_ids)
            if self._needs == "residual_out":  # completed, and handed over, at the layer's output
                self._awaiting_output = plan
            else:
                self.session.submit(functools.partial(plan, list(self._states)))
        else:
            self._awaiting_output = None

    def _follow_tokens(self) -> None:
        """The step before has run: the recurrence learns its tokens' experts."""
        if self.step < 0 or not self._history:
            return
        ids = torch.stack([h[0] for h in self._history], 1).numpy()  # (N, L, k)
        routing = ids.reshape(-1, self._step_tokens, *ids.shape[1:])  # (B, T, L, k)
        self.session.end_token(routing[:, -1], routing[:, :-1] if routing.shape[1] > 1 else None)

    def _oracle_requests(self, layer: int) -> list:
        log, width = self.oracle, len(self.layers)

        def experts_at(position: int) -> list[int]:
            step, g = divmod(position, width)
            return log[step][g] if step < len(log) else []

        position = self.session.position(self.step, layer)
        return oracle_requests(experts_at, position, self.prefetch.oracle_reach, len(log) * width, width)

    # --- hidden states: what a predictor reads besides routing, and the next-token guess -----
    def _state_hooks(self, needs: str | None) -> list:
        """Hooks on the predictor stack's layers: router inputs are kept as they enter each
        block; a layer's residual output is kept, and planned from, when the layer has run."""
        self._needs, self._states = needs, []
        hooks, guess = [], None if self.next_token is None else self.next_token.guess_layer
        for g, layer in enumerate(self.layers):
            if layer.stack != self.predictor_stack:
                continue
            local = g - self._stack_range[g][0]
            if needs == "router_input":
                hooks.append(layer.block.register_forward_pre_hook(functools.partial(self._on_router_input, g)))
            if needs == "residual_out" or local == guess:
                hooks.append(layer.residual_parent.register_forward_hook(functools.partial(self._on_output, g)))
        return hooks

    def _on_router_input(self, layer: int, _module, args) -> None:
        if layer == self._stack_range[layer][0]:
            self._states = []
        self._states.append(args[0].reshape(-1, args[0].shape[-1]).detach())

    def _on_output(self, layer: int, _module, _args, output) -> None:
        """``layer`` has run: a residual-reading predictor plans now, and at the guess layer
        the next token is guessed."""
        hidden = output[0] if isinstance(output, tuple) else output
        if self._needs == "residual_out":
            if layer == self._stack_range[layer][0]:
                self._states = []
            self._states.append(hidden.reshape(-1, hidden.shape[-1]).detach())
            if self._awaiting_output is not None:
                self.session.submit(functools.partial(self._awaiting_output, list(self._states)))
        if self.next_token is not None and layer - self._stack_range[layer][0] == self.next_token.guess_layer:
            residual = hidden[:, -1] if hidden.dim() == 3 else hidden[-1:]  # each sequence's newest token
            with self.session.predicting():  # on this thread: see NextTokenPlanner.guess
                ids, probs = self.next_token.guess(residual.detach())
            self.guess_log.append((self.step, ids[:, 0].tolist()))
            # kept: no later plan of this step covers the next one
            made_at = self.session.position(self.step, layer)
            self.session.submit(functools.partial(self._guess_requests, ids, probs, self.step, made_at), keep=True)

    def _guess_requests(self, ids: np.ndarray, probs: np.ndarray, step: int, made_at: int) -> Forecast:
        rows = self.next_token.plan(ids, probs, by_value=self._by_value)
        return Forecast.of_rows(rows, step + 1, len(self.layers), made_at)

    def _plan(
        self, step: int, layer: int, first: int, history: list, token_ids: torch.Tensor, states: list
    ) -> Forecast:
        ids = torch.stack([h[0] for h in history], 1)  # (N, l+1, k)
        weights = torch.stack([h[1] for h in history], 1).float()
        n = ids.shape[0]
        tokens = token_ids if len(token_ids) == n else torch.zeros(n, dtype=torch.long)
        hidden = torch.stack(states, 1).cpu() if self._needs else None  # (N, l+1, D)
        rows = self.planner.plan(layer, ids.numpy(), weights.numpy(), tokens.numpy(), offset=first, hidden=hidden)
        return Forecast.of_rows(rows, step, len(self.layers), self.session.position(step, first + layer))

    def close(self) -> None:
        """Stop prefetching, remove the hooks and put the (empty) experts modules back, so
        that another runtime may run the model (given ``layouts``)."""
        for hook in self._input_hooks:
            hook.remove()
        for hook in self._hooks:
            hook.remove()
        self.session.close()
        self.transfer.close()
        for layer in self.layers:
            wrapper = getattr(layer.block, self.loaded.adapter.experts_attr)
            if isinstance(wrapper, OffloadedExperts):
                setattr(layer.block, self.loaded.adapter.experts_attr, wrapper._original[0])


def _default_policy(predictor, oracle, prefetch: PrefetchSettings) -> str:
    if predictor is not None:
        return "prefetch"
    if oracle is not None:
        return "oracle" if prefetch.eviction == "belady" else "oracle-prefetch"
    return prefetch.eviction


def _stack_ranges(stacks: dict[str, int]) -> list[tuple[int, int]]:
    """Per global layer: the [first, end) global range of its stack (layers run stack by stack)."""
    ranges, first = [], 0
    for count in stacks.values():
        ranges += [(first, first + count)] * count
        first += count
    return ranges


def _check_predictor(predictor, loaded: LoadedModel, stack: str) -> None:
    if predictor is None:
        return
    predictor.check_fits(loaded.stacks[stack], loaded.num_experts, f"the {stack} of {loaded.model_id}")
    if predictor.previous_tokens:
        raise InputError(f"runtime prefetch gives predictors no earlier tokens; {predictor.name} reads them")
    if predictor.needs_hidden not in (None, "router_input", "residual_out"):
        raise InputError(f"runtime prefetch keeps router_input or residual_out states, not {predictor.needs_hidden!r}")


def _fast_device(device) -> torch.device:
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"device {device} was asked for, but this machine has no CUDA GPU")
    if device.type not in ("cpu", "cuda"):
        raise InputError(f"the offload runtime runs on cpu or cuda, got {device}")
    return device
