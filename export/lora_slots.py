"""LoRA slots: the adaptable layers of an exported graph take their LoRA factors as optional graph inputs.

This is onnxruntime's multi-LoRA layout (onnxruntime >= 1.20). Every slotted layer computes

    y = base(x) + up(down(x))

- a ``Linear`` layer: ``down`` is ``x @ A`` with A float32 [in, r], ``up`` is ``@ B`` with B [r, out];
- a ``Conv2d`` layer: ``down`` is a convolution with A [r, in, kh, kw] (the base layer's stride, padding and
  dilation), ``up`` a 1x1 convolution with B [out, r, 1, 1].

A and B are graph inputs that are also initializers holding a rank-0 default ([in, 0], [0, out], ...): run
without an adapter, the graph is the plain base model; an adapter (an ``.onnx_adapter`` file, see
:mod:`isekai.export.adapters`) sets them for one run (``RunOptions.add_active_adapter``), the LoRA scale
(alpha / rank) folded into B. The rank is a symbolic dimension of each slot, so adapters of any rank fit.

Slot names are the layer's module path in the diffusers / transformers model plus ``.lora_A`` / ``.lora_B``,
e.g. ``down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A`` or
``encoder.layers.3.self_attn.q_proj.lora_B``; :func:`read_slots` lists a graph's slots with their shapes,
which is all the adapter writer needs to check a LoRA file against the exported base.

Which layers get slots (``--lora-targets``, :data:`isekai.constants.LORA_TARGET_FAMILIES`):

- ``attention``: the attention projections ``to_q``, ``to_k``, ``to_v``, ``to_out.0`` (diffusers'
  ``train_dreambooth_lora.py``);
- ``transformer``: every layer of the transformer blocks, adding ``proj_in``, ``proj_out`` and the
  feed-forward layers (kohya's LoRA);
- ``all``: every ``Linear`` and ``Conv2d`` (kohya's LoCon, the LCM-LoRA).

The text encoder always gets slots on every ``Linear`` of its layers (attention and MLP): they are cheap.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from isekai import constants as C

SLOT_A = ".lora_A"
SLOT_B = ".lora_B"
# The rank the slots are traced with: any rank above 1 works (the rank is made symbolic afterwards); the
# traced factors never reach the exported file.
TRACE_RANK = 2
# Graph metadata keys (ModelProto.metadata_props) written by open_slots.
LAYERS_KEY = "isekai.lora_layers"
TARGETS_KEY = "isekai.lora_targets"

_ATTENTION = ("to_q", "to_k", "to_v", "to_out.0")


@dataclass(frozen=True)
class SlotShape:
    """One slot's layer: ``kind`` "linear" or "conv"; ``kernel`` (kh, kw) of a conv, (1, 1) for a linear."""

    kind: str
    in_features: int
    out_features: int
    kernel: tuple[int, int] = (1, 1)

    def a_shape(self, rank: int) -> tuple[int, ...]:
        if self.kind == "linear":
            return (self.in_features, rank)
        return (rank, self.in_features, *self.kernel)

    def b_shape(self, rank: int) -> tuple[int, ...]:
        if self.kind == "linear":
            return (rank, self.out_features)
        return (self.out_features, rank, 1, 1)


def _ends_with(path: str, suffixes: Iterable[str]) -> bool:
    return any(path == s or path.endswith("." + s) for s in suffixes)


def unet_layers(unet: torch.nn.Module, family: str) -> list[str]:
    """Module paths of the UNet's layers that ``family`` slots (see the module docstring), in module order."""
    if family not in C.LORA_TARGET_FAMILIES:
        raise ValueError(f"LoRA targets should be one of {C.LORA_TARGET_FAMILIES} but are {family!r}")
    paths = []
    for path, module in unet.named_modules():
        if not isinstance(module, torch.nn.Linear | torch.nn.Conv2d):
            continue
        # The transformer blocks (Transformer2DModel) are the UNet's ``attentions.N`` modules.
        in_transformer = ".attentions." in f".{path}."
        if (
            family == "all"
            or family == "transformer" and in_transformer
            or family == "attention" and in_transformer and _ends_with(path, _ATTENTION)
        ):
            paths.append(path)
    return paths


def text_encoder_layers(text_encoder: torch.nn.Module) -> list[str]:
    """Module paths of every ``Linear`` in the text encoder's transformer layers (attention and MLP)."""
    return [
        path for path, module in text_encoder.named_modules()
        if isinstance(module, torch.nn.Linear) and ".layers." in f".{path}"
    ]


class LinearSlot(torch.nn.Module):
    """``base(x) + (x @ lora_A) @ lora_B``; lora_A [in, r], lora_B [r, out]."""

    def __init__(self, base: torch.nn.Linear, rank: int = TRACE_RANK) -> None:
        super().__init__()
        self.base = base
        self.shape = SlotShape("linear", base.in_features, base.out_features)
        self.register_buffer("lora_A", torch.zeros(self.shape.a_shape(rank)))
        self.register_buffer("lora_B", torch.zeros(self.shape.b_shape(rank)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # rank 0: the plain layer (fixed when tracing, which uses a positive rank)
        if self.lora_A.numel() == 0:
            return self.base(x)
        return self.base(x) + torch.matmul(torch.matmul(x, self.lora_A), self.lora_B)


class ConvSlot(torch.nn.Module):
    """``base(x) + conv1x1(conv(x, lora_A), lora_B)``; lora_A [r, in, kh, kw], lora_B [out, r, 1, 1]."""

    def __init__(self, base: torch.nn.Conv2d, rank: int = TRACE_RANK) -> None:
        super().__init__()
        if base.groups != 1:
            raise ValueError(f"grouped convolutions have no LoRA slot (groups={base.groups})")
        self.base = base
        self.shape = SlotShape("conv", base.in_channels, base.out_channels, tuple(base.kernel_size))
        self.register_buffer("lora_A", torch.zeros(self.shape.a_shape(rank)))
        self.register_buffer("lora_B", torch.zeros(self.shape.b_shape(rank)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = self.base
        if self.lora_A.numel() == 0:  # rank 0: torch's conv2d refuses zero output channels
            return b(x)
        down = torch.nn.functional.conv2d(x, self.lora_A, None, b.stride, b.padding, b.dilation)
        return b(x) + torch.nn.functional.conv2d(down, self.lora_B)


Slot = LinearSlot | ConvSlot


def add_slots(model: torch.nn.Module, paths: Iterable[str]) -> dict[str, Slot]:
    """Replace each layer at ``paths`` in ``model`` (in place) by its slot; return path -> slot.

    The slots start with non-zero traced factors (so nothing folds them away while exporting); call
    :func:`set_factors` to give them other values.
    """
    slots: dict[str, Slot] = {}
    for path in paths:
        parent_path, _, name = path.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        layer = getattr(parent, name) if not name.isdigit() else parent[int(name)]
        slot = LinearSlot(layer) if isinstance(layer, torch.nn.Linear) else ConvSlot(layer)
        g = torch.Generator().manual_seed(len(slots))
        slot.lora_A.copy_(torch.randn(slot.lora_A.shape, generator=g) * 0.01)
        slot.lora_B.copy_(torch.randn(slot.lora_B.shape, generator=g) * 0.01)
        if name.isdigit():
            parent[int(name)] = slot
        else:
            setattr(parent, name, slot)
        slots[path] = slot
    return slots


def set_factors(slots: Mapping[str, Slot], factors: Mapping[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Give each slot the (A, B) of ``factors``, and rank 0 (the plain base layer) to every other slot."""
    unknown = sorted(set(factors) - set(slots))
    if unknown:
        raise KeyError(f"no slot for {unknown[:3]}")
    for path, slot in slots.items():
        a, b = factors.get(path, (torch.zeros(slot.shape.a_shape(0)), torch.zeros(slot.shape.b_shape(0))))
        slot.lora_A = a.detach().float().clone()
        slot.lora_B = b.detach().float().clone()


def open_slots(
    onnx_path: str | Path,
    prefix: str,
    layers: Iterable[str],
    targets: str | None,
    rename: Callable[[str], str] | None = None,
) -> int:
    """Turn the traced slot factors of an exported graph into optional graph inputs with rank-0 defaults.

    The exporter names each slot's buffers ``<prefix><path>.lora_A`` (``prefix`` is the export wrapper's
    attribute, e.g. ``"unet."``). Each becomes an initializer ``<path>.lora_A`` holding an empty default and a
    graph input of the same name whose rank axis is symbolic (``rename`` maps the module path to the slot's
    name). Every adaptable layer of the model (``layers``) and the target family are recorded in the graph's
    metadata (:data:`LAYERS_KEY`, :data:`TARGETS_KEY`), so a LoRA for a layer without a slot is told apart
    from one for another model. Rewrites ``onnx_path`` in place (external data, if any, is left where it is);
    returns the number of slots.
    """
    rename = rename or (lambda p: p)
    import onnx  # noqa: PLC0415
    from onnx import helper, numpy_helper  # noqa: PLC0415

    model = onnx.load(str(onnx_path), load_external_data=False)
    graph = model.graph
    renames: dict[str, str] = {}
    kept = []
    inputs = []
    for init in graph.initializer:
        name = init.name
        if name.startswith(prefix) and name.endswith((SLOT_A, SLOT_B)):
            path, _, factor = name[len(prefix):].rpartition(".")
            new = f"{rename(path)}.{factor}"
            renames[name] = new
            dims = list(init.dims)
            # linear A [in, r], B [r, out]; conv A [r, in, kh, kw], B [out, r, 1, 1]
            rank_axis = int(name.endswith(SLOT_A)) if len(dims) == 2 else int(name.endswith(SLOT_B))
            empty = dims.copy()
            empty[rank_axis] = 0
            symbolic: list[int | str] = list(dims)
            symbolic[rank_axis] = new.rsplit(".", 1)[0] + ".rank"
            kept.append(numpy_helper.from_array(np.zeros(empty, np.float32), new))
            inputs.append(helper.make_tensor_value_info(new, onnx.TensorProto.FLOAT, symbolic))
        else:
            kept.append(init)
    if not renames:
        raise ValueError(f"{onnx_path}: no LoRA slot initializers named {prefix}*{SLOT_A} were exported")
    del graph.initializer[:]
    graph.initializer.extend(kept)
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name in renames:
                node.input[i] = renames[name]
    graph.input.extend(inputs)
    for key, value in ((LAYERS_KEY, json.dumps([rename(p) for p in layers])), (TARGETS_KEY, targets or "")):
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(model, str(onnx_path))
    return len(renames) // 2


def graph_layers(onnx_path: str | Path) -> tuple[list[str], str]:
    """Every adaptable layer recorded in a slotted graph (:func:`open_slots`) and its target family."""
    import onnx  # noqa: PLC0415

    meta = {p.key: p.value for p in onnx.load(str(onnx_path), load_external_data=False).metadata_props}
    if LAYERS_KEY not in meta:
        raise ValueError(f"{onnx_path} has no LoRA slots: export the base model again with this version of "
                         "isekai")
    return json.loads(meta[LAYERS_KEY]), meta.get(TARGETS_KEY, "")


def read_slots(onnx_path: str | Path) -> dict[str, SlotShape]:
    """The slots of an exported graph: path -> the layer's shape, read from the slot inputs' dims."""
    import onnx  # noqa: PLC0415

    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    dims = {
        v.name: [d.dim_value if d.HasField("dim_value") else None for d in v.type.tensor_type.shape.dim]
        for v in graph.input
    }
    slots = {}
    for name, a in dims.items():
        if not name.endswith(SLOT_A):
            continue
        path = name[: -len(SLOT_A)]
        b = dims.get(path + SLOT_B)
        if b is None:
            raise ValueError(f"{onnx_path}: slot {path} has {SLOT_A} but no {SLOT_B}")
        if len(a) == 2:
            slots[path] = SlotShape("linear", int(a[0]), int(b[1]))
        else:
            slots[path] = SlotShape("conv", int(a[1]), int(b[0]), (int(a[2]), int(a[3])))
    return slots


# ------------------------------------------------------------------------------------------------------------
# Fusing an adapter into the graph (TensorRT plans, a fused base): W + scale * up @ down, slots removed.
# ------------------------------------------------------------------------------------------------------------
def _slot_nodes(graph, path: str) -> tuple[Any, Any, Any, Any, str]:
    """(down node, up node, the Add joining the base layer, the base layer's node, the base output name)."""
    consumers: dict[str, list[Any]] = {}
    producers: dict[str, Any] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
        for name in node.output:
            producers[name] = node
    down = consumers[path + SLOT_A][0]
    up = consumers[down.output[0]][0]
    add = consumers[up.output[0]][0]
    if len(consumers[up.output[0]]) != 1 or add.op_type != "Add":
        raise ValueError(f"slot {path}: its up factor does not feed one Add (the layout open_slots writes)")
    base_out = next(name for name in add.input if name != up.output[0])
    x = down.input[0]
    node = producers.get(base_out)
    while node is not None and not (node.op_type in ("MatMul", "Gemm", "Conv") and node.input[0] == x):
        node = producers.get(node.input[0])  # through the bias Add the exporter puts after a MatMul
    if node is None:
        raise ValueError(f"slot {path}: no MatMul/Gemm/Conv on its input {x!r} feeds its Add")
    return down, up, add, node, base_out


def _delta(node, weight: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The base weight's change, in the base node's own layout."""
    if node.op_type == "Conv":
        return np.einsum("or,rikl->oikl", b[:, :, 0, 0], a)
    delta = a @ b  # [in, out]
    trans_b = next((attr.i for attr in node.attribute if attr.name == "transB"), 0)
    return delta.T if node.op_type == "Gemm" and trans_b else delta


def fuse_adapter(model, params: Mapping[str, np.ndarray] | None, base_dir: str | Path | None = None):
    """``model`` (an onnx.ModelProto with slots, its weights loaded) with ``params`` fused into the base
    weights and every slot removed: the plain graph a TensorRT plan is built from. ``params`` None only
    removes the slots (the base). Each slot's branch ``Add(base, up(down(x)))`` becomes ``base``; the base
    layer's weight gets ``A @ B`` in its own layout (MatMul [in, out], Gemm with transB [out, in],
    Conv [out, in, kh, kw]). ``base_dir`` is where the model's external data lies, if its weights are not
    loaded yet.
    """
    from onnx import numpy_helper  # noqa: PLC0415

    graph = model.graph
    paths = sorted({i.name[: -len(SLOT_A)] for i in graph.input if i.name.endswith(SLOT_A)})
    unknown = sorted(set(params or {}) - {p + s for p in paths for s in (SLOT_A, SLOT_B)})
    if unknown:
        raise ValueError(f"adapter parameters {unknown[:3]} name no slot of the graph")
    inits = {init.name: init for init in graph.initializer}
    uses: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            uses[name] = uses.get(name, 0) + 1
    drop_nodes, renames = [], {}
    for path in paths:
        down, up, add, node, base_out = _slot_nodes(graph, path)
        if params and path + SLOT_A in params:
            name = node.input[1]
            if uses.get(name) != 1 or name not in inits:
                raise ValueError(f"slot {path}: its base weight {name!r} is not an initializer of its own")
            weight = numpy_helper.to_array(inits[name], base_dir=str(base_dir or ""))
            fused = weight + _delta(node, weight, params[path + SLOT_A],
                                    params[path + SLOT_B]).astype(weight.dtype)
            inits[name].CopyFrom(numpy_helper.from_array(fused, name))
        drop_nodes += [down, up, add]
        renames[add.output[0]] = base_out
    dropped = {id(n) for n in drop_nodes}
    kept = [n for n in graph.node if id(n) not in dropped]
    del graph.node[:]
    graph.node.extend(kept)
    for node in graph.node:
        for i, name in enumerate(node.input):
            while name in renames:
                name = renames[name]
            node.input[i] = name
    for output in graph.output:
        while output.name in renames:
            output.name = renames[output.name]
    slot_names = {p + s for p in paths for s in (SLOT_A, SLOT_B)}
    keep_inputs = [i for i in graph.input if i.name not in slot_names]
    del graph.input[:]
    graph.input.extend(keep_inputs)
    keep_inits = [i for i in graph.initializer if i.name not in slot_names]
    del graph.initializer[:]
    graph.initializer.extend(keep_inits)
    return model
