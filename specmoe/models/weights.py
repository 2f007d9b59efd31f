"""How each parameter of a model is made from a checkpoint's tensors, so that a model can be
built piece by piece: its non-expert parameters loaded one at a time, each expert read on
its own.

The rules are transformers' own (``conversion_mapping``): renamings (Mixtral's
``block_sparse_moe`` is ``mlp``), and converters that fuse a checkpoint's per-expert tensors
into ``(num_experts, ...)`` parameters (``experts.*.gate_proj`` and ``up_proj`` into
``gate_up_proj``). Applied to one expert's tensors, a converter whose operations act on each
expert alone (stacking, concatenating within an expert, transposing within one) yields that
expert's slice; a parameter stored as the model holds it gives up an expert's slice as one
byte range.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
from torch import nn

from specmoe.errors import InputError
from specmoe.models.checkpoint import SafetensorsCheckpoint, TensorEntry


@dataclass
class ParameterSource:
    """The checkpoint keys one parameter is made of: by the converter's source pattern (""
    for a tensor stored as the model holds it), in expert order."""

    converter: object | None
    keys: dict[str, list[str]] = field(default_factory=dict)


class WeightPlan:
    """Where every parameter and persistent buffer of ``model`` (a skeleton: its parameters
    may be on the meta device) comes from in ``checkpoint``."""

    def __init__(self, model: nn.Module, checkpoint: SafetensorsCheckpoint):
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, rename_source_key

        self.checkpoint = checkpoint
        self.config = model.config
        transforms = get_model_conversion_mapping(model)
        converters = [t for t in transforms if isinstance(t, WeightConverter)]
        renamings = [t for t in transforms if not isinstance(t, WeightConverter)]
        names = model.state_dict(keep_vars=True)
        self.sources: dict[str, ParameterSource] = {}
        self.unused: list[str] = []
        for key in checkpoint.keys():
            target, pattern = rename_source_key(key, renamings, converters, model.base_model_prefix, names)
            if target not in names:
                self.unused.append(key)
                continue
            converter = next((c for c in converters if pattern in c.source_patterns), None) if pattern else None
            source = self.sources.setdefault(target, ParameterSource(converter))
            source.keys.setdefault(pattern or "", []).append(key)
        for source in self.sources.values():
            for keys in source.keys.values():
                keys.sort(key=_natural)

    def __contains__(self, name: str) -> bool:
        return name in self.sources

    def source(self, name: str) -> ParameterSource:
        if name not in self.sources:
            raise InputError(
                f"{self.checkpoint.directory}: no tensor of the checkpoint makes the model's {name}; "
                "the checkpoint does not match its config.json"
            )
        return self.sources[name]

    def tensor(self, name: str) -> torch.Tensor:
        """The whole parameter, as the model holds it."""
        source = self.source(name)
        if source.converter is None:
            return self.checkpoint.read(source.keys[""][0])
        tensors = {pattern: [self.checkpoint.read(k) for k in keys] for pattern, keys in source.keys.items()}
        return self._convert(source.converter, tensors, name)

    def expert_segment(self, name: str, view: torch.Tensor) -> TensorEntry | None:
        """The byte range of one expert's slice ``view`` of parameter ``name`` (a view into
        the skeleton's parameter), if the checkpoint stores the parameter as the model holds
        it; None if the slice must be made by a converter."""
        source = self.source(name)
        if source.converter is not None:
            return None
        entry = self.checkpoint.entries[source.keys[""][0]]
        if not view.is_contiguous():
            raise InputError(f"{name}: an expert's slice is not contiguous; specmoe cannot read it piecewise")
        item = entry.nbytes // max(1, _numel(entry.shape))
        offset = view.storage_offset() if view._base is not None else 0
        return TensorEntry(
            entry.path, entry.offset + offset * item, view.numel() * item, entry.dtype, tuple(view.shape)
        )

    def expert_tensor(self, name: str, expert: int, view: torch.Tensor) -> torch.Tensor:
        """Expert ``expert``'s slice of parameter ``name``, shaped as ``view``."""
        segment = self.expert_segment(name, view)
        if segment is not None:
            return self.checkpoint.read(segment)
        source = self.source(name)
        _check_expert_local(source.converter, name)
        tensors = {}
        for pattern, keys in source.keys.items():
            if expert >= len(keys):
                raise InputError(
                    f"{self.checkpoint.directory}: {name} needs expert {expert}, the checkpoint has {len(keys)}"
                )
            tensors[pattern] = [self.checkpoint.read(keys[expert])]
        return self._convert(source.converter, tensors, name).reshape(view.shape)

    def expert_ranges(self, name: str, expert: int, view: torch.Tensor) -> list[TensorEntry] | None:
        """Byte ranges that, read one after another into one buffer, are expert ``expert``'s
        slice of ``name``; None where a converter does more than stack and concatenate."""
        segment = self.expert_segment(name, view)
        if segment is not None:
            return [segment]
        source = self.source(name)
        ops = [type(op).__name__ for op in source.converter.operations]
        concatenates_rows = all(getattr(op, "dim", 1) == 1 for op in source.converter.operations[1:])
        if ops[0] != "MergeModulelist" or set(ops[1:]) - {"Concatenate"} or not concatenates_rows:
            return None
        return [self.checkpoint.entries[source.keys[p][expert]] for p in source.converter.source_patterns]

    def _convert(self, converter, tensors: dict[str, list[torch.Tensor]], name: str) -> torch.Tensor:
        for op in converter.operations:
            tensors = op.convert(
                tensors,
                source_patterns=converter.source_patterns,
                target_patterns=converter.target_patterns,
                full_layer_name=name,
                config=self.config,
            )
        matching = [t for pattern, t in tensors.items() if name.endswith(pattern.split("*")[-1].lstrip("."))]
        if len(tensors) == 1:
            return next(iter(tensors.values()))
        if len(matching) != 1:
            raise InputError(f"{name}: the checkpoint's conversion does not give one tensor for it")
        return matching[0]


def set_tensor(model: nn.Module, name: str, tensor: torch.Tensor) -> None:
    """Put ``tensor`` in place of the parameter or buffer ``name`` (a skeleton's meta one)."""
    owner_name, _, leaf = name.rpartition(".")
    owner = model.get_submodule(owner_name) if owner_name else model
    if leaf in owner._parameters:
        owner._parameters[leaf] = nn.Parameter(tensor, requires_grad=False)
    else:
        owner._buffers[leaf] = tensor


_EXPERT_LOCAL = {"MergeModulelist", "Concatenate", "Transpose"}


def _check_expert_local(converter, name: str) -> None:
    """An expert's slice can be made from its own tensors only if no operation mixes experts:
    stacking them (dim 0), and concatenating or transposing dimensions within one."""
    for op in converter.operations:
        kind = type(op).__name__
        dims = [getattr(op, attr) for attr in ("dim", "dim0", "dim1") if hasattr(op, attr)]
        if kind not in _EXPERT_LOCAL or (kind != "MergeModulelist" and 0 in dims):
            raise InputError(
                f"{name}: the checkpoint's conversion ({kind}) mixes experts; specmoe cannot read one alone"
            )


def _numel(shape) -> int:
    count = 1
    for size in shape:
        count *= size
    return count


def _natural(key: str):
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", key)]
