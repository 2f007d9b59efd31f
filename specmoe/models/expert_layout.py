"""Where one MoE layer's per-expert weights live inside its ``experts`` module, and how to
hand that module's own forward just the experts a call needs.

The layout is discovered, not declared: the adapter's ``expert_parameters(layer, e)`` gives
the tensors of expert ``e``, and each is matched against the module's parameters.

- ``stacked``: ``e``'s tensors are ``p[e]`` of ``(E, ...)`` parameters (Mixtral, Qwen-MoE,
  OLMoE, DeepSeek, gpt-oss, PhiMoE, GraniteMoE). A call gets a compact ``(n, ...)`` stack of
  the needed experts, and expert ids remapped to positions in it.
- ``rows``: ``e``'s tensors are row blocks of ``(E * F, ...)`` parameters (DBRX): the same,
  concatenated.
- ``modules``: each expert is a submodule of its own (Switch's ``expert_{e}``): a call gets
  the needed experts' parameters under their own names; the others are never run.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from specmoe.errors import InputError
from specmoe.models.base import MoELayer


@dataclass
class ExpertLayout:
    kind: str
    """``stacked``, ``rows`` or ``modules``."""
    names: list[list[str]]
    """``names[e]``: the experts-module parameter names expert ``e``'s tensors come from
    (the same for every expert unless ``kind == "modules"``)."""
    num_experts: int

    @property
    def remaps_ids(self) -> bool:
        return self.kind != "modules"

    def parameters_for(self, tensors: dict[int, list[torch.Tensor]]) -> dict[str, torch.Tensor]:
        """The parameters to run the experts module with, given the needed experts' tensors
        (``tensors[e]``, in ``expert_parameters`` order), in ascending expert order."""
        needed = sorted(tensors)
        if self.kind == "modules":
            return {name: t for e in needed for name, t in zip(self.names[e], tensors[e])}
        if len(needed) == 1:  # a stack of one is a view: no copy
            only = tensors[needed[0]]
            return {n: t.unsqueeze(0) if self.kind == "stacked" else t for n, t in zip(self.names[0], only)}
        join = torch.stack if self.kind == "stacked" else torch.cat
        return {name: join([tensors[e][i] for e in needed]) for i, name in enumerate(self.names[0])}

    def remap(self, needed: list[int], device) -> torch.Tensor:
        """Maps an expert id to its position among ``needed``; any other id (including the
        ``num_experts`` some families use as padding) maps past the compact stack."""
        table = torch.full((self.num_experts + 1,), self.num_experts, dtype=torch.long, device=device)
        table[torch.tensor(needed, dtype=torch.long, device=device)] = torch.arange(len(needed), device=device)
        return table


def discover_layout(adapter, layer: MoELayer, num_experts: int) -> ExpertLayout:
    """Match each expert's tensors to the experts module's parameters; refuses, naming the
    family, any layout that is not one of the three above."""
    experts = getattr(layer.block, adapter.experts_attr, None)
    reason = getattr(adapter, "offload_unsupported", None)
    if experts is None or reason:
        raise InputError(
            f"the offload runtime cannot run {adapter.family} experts: "
            f"{reason or 'its MoE block has no ' + repr(adapter.experts_attr) + ' submodule'}"
        )
    params = dict(experts.named_parameters())
    kinds, names = set(), []
    for e in range(num_experts):
        row = []
        for view in adapter.expert_parameters(layer, e):
            name, kind = _owner(params, view)
            if name is None:
                raise InputError(
                    f"the offload runtime cannot run {adapter.family} experts: a weight of expert {e} in "
                    f"{layer.name} is not a parameter of its experts module"
                )
            row.append(name)
            kinds.add(kind)
        names.append(row)
    covered = {n for row in names for n in row}
    resident = [n for n, p in params.items() if n not in covered and p.dim() >= 2]
    if len(kinds) != 1 or resident:
        raise InputError(
            f"the offload runtime cannot run {adapter.family} experts: mixed per-expert layouts {sorted(kinds)} "
            f"or per-expert matrices it does not know of ({resident})"
        )
    return ExpertLayout(kinds.pop(), names, num_experts)


def _owner(params: dict[str, nn.Parameter], view: torch.Tensor) -> tuple[str | None, str]:
    """The parameter ``view`` is (``modules``) or is a slice of: a view of it (which works on
    the meta device too, where every storage is at address 0), or one sharing its storage."""
    for name, p in params.items():
        if view is p:
            return name, "modules"
    for name, p in params.items():
        if view._base is p or (
            p.numel() and not p.is_meta and view.untyped_storage().data_ptr() == p.untyped_storage().data_ptr()
        ):
            return name, "stacked" if view.dim() == p.dim() - 1 else "rows"
    return None, ""


def empty_parameters(experts: nn.Module, names: set[str]) -> None:
    """Drop the resident copies of ``names`` (the weights now live in the slow tier)."""
    for name in names:
        owner_name, _, leaf = name.rpartition(".")
        owner = experts.get_submodule(owner_name) if owner_name else experts
        dtype = getattr(owner, leaf).dtype
        setattr(owner, leaf, nn.Parameter(torch.empty(0, dtype=dtype), requires_grad=False))
