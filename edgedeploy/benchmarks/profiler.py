"""Per-layer parameter, MAC and activation-memory profiling from the model's actual graph.

MACs are counted as `edgedeploy.models.complexity` counts them (`torch.utils.flop_counter.FlopCounterMode`:
convolutions, matmuls, linear layers, attention), here broken down per module.

`profile_onnx` counts the same quantities from an ONNX graph (Conv, ConvTranspose, Gemm, MatMul), so an exported
file can be checked against its PyTorch source.
"""

from __future__ import annotations

import weakref
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode

from edgedeploy.models.complexity import count_params, counted_forward, image_hw


@dataclass
class LayerStats:
    """One row of the per-layer table. `params` and `macs` are the layer's own, excluding its children."""

    name: str
    type: str
    output_shape: list[int] | None
    params: int
    macs: int


@dataclass
class Profile:
    params: int
    macs: int
    imgsz: tuple[int, int]
    peak_activation_bytes: int  # see `profile_model`: live activation bytes at the worst point of a batch-1 forward
    layers: list[LayerStats] = field(default_factory=list)
    source: str = "torch"  # "torch" or "onnx"
    notes: list[str] = field(default_factory=list)  # caveats about the counts, shown with the table

    def top(self, n: int | None) -> list[LayerStats]:
        """The `n` layers with the most MACs (all layers when n is None or <= 0)."""
        ranked = sorted(self.layers, key=lambda r: r.macs, reverse=True)
        return ranked if not n or n <= 0 else ranked[:n]

    def to_dict(self, top: int | None = None) -> dict:
        d = asdict(self)
        d["imgsz"] = list(self.imgsz)
        d["layers"] = [asdict(r) for r in self.top(top)]
        return d

    def format(self, top: int | None = 15) -> str:
        lines = [
            f"params  {self.params / 1e6:.3f} M",
            f"MACs    {self.macs / 1e9:.3f} G  at {self.imgsz[0]}x{self.imgsz[1]}, batch 1",
        ]
        if self.peak_activation_bytes:
            lines.append(f"peak activation memory  {self.peak_activation_bytes / 2**20:.2f} MiB  (fp32, batch 1)")
        lines.extend(f"note: {note}" for note in self.notes)
        rows = self.top(top)
        if rows:
            width = max(len(r.name) for r in rows)
            lines.append("")
            lines.append(f"top {len(rows)} layers by MACs:")
            lines.append(f"{'layer':<{width}}  {'type':<22} {'output':<20} {'params':>10} {'MACs':>13} {'share':>6}")
            for r in rows:
                shape = "x".join(str(s) for s in r.output_shape) if r.output_shape else "-"
                share = 100.0 * r.macs / self.macs if self.macs else 0.0
                lines.append(
                    f"{r.name:<{width}}  {r.type[:22]:<22} {shape[:20]:<20} {r.params:>10,} {r.macs:>13,} {share:>5.1f}%"  # noqa: E501
                )
        return "\n".join(lines)


class _LiveActivationTracker(TorchDispatchMode):
    """Tracks bytes of tensor storages alive during a forward pass, in execution order.

    Every aten op's output storages are counted once when first seen and released when the last tensor
    referring to them is garbage-collected (eager PyTorch frees an intermediate as soon as nothing refers to it).
    Parameters and buffers are excluded because no op in the forward creates them.
    """

    def __init__(self, initial: list[torch.Tensor]):
        super().__init__()
        self.live = 0
        self.peak = 0
        self._refs: dict[int, int] = {}  # storage data_ptr -> number of live tensors using it
        self._sizes: dict[int, int] = {}
        for t in initial:
            self._track(t)

    def _release(self, key: int) -> None:
        self._refs[key] -= 1
        if self._refs[key] == 0:
            self.live -= self._sizes.pop(key)
            del self._refs[key]

    def _track(self, t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if key == 0:  # empty tensors have no storage
            return
        if key not in self._refs:
            self._refs[key] = 0
            self._sizes[key] = storage.nbytes()
            self.live += storage.nbytes()
            self.peak = max(self.peak, self.live)
        self._refs[key] += 1
        weakref.finalize(t, self._release, key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                self._track(t)
        return out


@torch.no_grad()
def profile_model(
    model: nn.Module,
    imgsz: int | tuple[int, int] = 224,
    top: int | None = None,
    in_chans: int = 3,
) -> Profile:
    """Profile any `nn.Module` with one batch-1 forward pass on its own device.

    - `params`, `macs`: totals (MACs from FlopCounterMode, see the module docstring).
    - `layers`: one row per module that owns parameters or MACs, with its *exclusive* share (a container's
      own functional ops, e.g. an attention block's matmuls, appear on the container), so the rows sum exactly
      to the totals. Output shape is that of the module's first call. `top` keeps the N heaviest rows.
    - `peak_activation_bytes`: the largest total size of tensors alive at once during the forward (input
      included, weights excluded), measured by tracking every op output's storage until it is freed. It is
      what eager PyTorch needs; an engine that fuses layers and reuses buffers needs the same or less.
    """
    h, w = image_hw(imgsz)
    names = {m: n for n, m in model.named_modules()}
    shapes: dict[str, list[int] | None] = {}

    def record_shape(module: nn.Module, _inputs, output) -> None:
        name = names.get(module)
        if name is None or name in shapes:
            return
        t = output[0] if isinstance(output, (tuple, list)) and output else output
        shapes[name] = list(t.shape) if isinstance(t, torch.Tensor) else None

    handles = [m.register_forward_hook(record_shape) for m in model.modules()]
    try:
        with counted_forward(model, (h, w), in_chans) as (x, counter):
            tracker = _LiveActivationTracker([x])
            with tracker:
                model(x)
    finally:
        for handle in handles:
            handle.remove()

    # FlopCounterMode keys are "<RootClass>.<dotted path>" with *inclusive* counts; make them exclusive.
    root_prefix = type(model).__name__
    inclusive: dict[str, int] = {}
    for key, ops in counter.get_flop_counts().items():
        if key == "Global":
            continue
        path = "" if key == root_prefix else key[len(root_prefix) + 1 :] if key.startswith(root_prefix + ".") else None
        if path is not None:
            inclusive[path] = sum(ops.values()) // 2
    total_macs = counter.get_total_flops() // 2

    # A module's own MACs = its inclusive count minus that of its nearest counted descendants (containers such
    # as ModuleList are never called, so a grandchild may be the nearest one).
    own: dict[str, int] = dict(inclusive)
    for path, macs in inclusive.items():
        if not path:
            continue
        parent = path
        while parent:
            parent = parent.rpartition(".")[0]
            if parent in inclusive:
                own[parent] -= macs
                break

    layers: list[LayerStats] = []
    for name, module in model.named_modules():
        own_macs = own.get(name, 0)
        own_params = sum(p.numel() for p in module.parameters(recurse=False))
        is_leaf = next(module.children(), None) is None
        if own_macs or own_params or (is_leaf and name in shapes):
            layers.append(LayerStats(name or "(root)", type(module).__name__, shapes.get(name), own_params, own_macs))

    profile = Profile(
        params=count_params(model),
        macs=total_macs,
        imgsz=(h, w),
        peak_activation_bytes=tracker.peak,
        layers=layers,
    )
    if top:
        profile.layers = profile.top(top)
    return profile


# --------------------------------------------------------------------------------------------------------- ONNX


def _onnx_shapes(model) -> dict[str, list[int] | None]:
    """Static shapes of every value (inputs, outputs, intermediates) after ONNX shape inference."""

    def dims(value_info) -> list[int] | None:
        t = value_info.type.tensor_type
        if not t.HasField("shape"):
            return None
        out = [d.dim_value if d.HasField("dim_value") else -1 for d in t.shape.dim]
        return out

    graph = model.graph
    shapes: dict[str, list[int] | None] = {}
    for vi in list(graph.input) + list(graph.value_info) + list(graph.output):
        shapes[vi.name] = dims(vi)
    for init in graph.initializer:
        shapes[init.name] = list(init.dims)
    return shapes


def _numel(shape: list[int] | None) -> int:
    if not shape or any(d < 0 for d in shape):
        return 0
    n = 1
    for d in shape:
        n *= d
    return n


_MAC_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


def _node_macs(node, shapes: dict[str, list[int] | None]) -> int:
    """MACs of one node; ops other than Conv/ConvTranspose/Gemm/MatMul count 0 (as in FlopCounterMode)."""
    op = node.op_type
    if op == "Conv" and len(node.input) > 1:
        w = shapes.get(node.input[1])
        return _numel(shapes.get(node.output[0])) * _numel(w[1:]) if w else 0
    if op == "ConvTranspose" and len(node.input) > 1:
        w = shapes.get(node.input[1])  # (C_in, C_out / groups, k...): each input element feeds C_out/g * k taps
        return _numel(shapes.get(node.input[0])) * _numel(w[1:]) if w else 0
    if op in ("Gemm", "MatMul"):
        a, out = shapes.get(node.input[0]), shapes.get(node.output[0])
        if not a or not out:
            return 0
        trans_a = any(attr.name == "transA" and attr.i for attr in node.attribute)
        k = a[0] if (op == "Gemm" and trans_a) else a[-1]
        return _numel(out) * k if k > 0 else 0
    return 0


def _pin_input_dims(model, initializers: set[str], imgsz: tuple[int, int] | None) -> None:
    """Give symbolic input dims static values: batch 1 (matching the batch-1 torch profile), H/W from `imgsz`."""
    for vi in model.graph.input:
        if vi.name in initializers:
            continue
        dims = vi.type.tensor_type.shape.dim
        for i, d in enumerate(dims):
            if d.HasField("dim_value"):
                continue
            if i == 0:
                d.dim_value = 1
            elif imgsz is not None and len(dims) == 4 and i >= 2:
                d.dim_value = imgsz[i - 2]


def _shapes_by_running(model, names: list[str]) -> dict[str, list[int]]:
    """Shapes of `names` from one onnxruntime run on zeros: for shape chains that static inference cannot
    follow (e.g. Shape -> Gather -> Div -> Reshape, as traced from `x.shape` in Python)."""
    import numpy as np
    import onnx
    import onnxruntime as ort
    from onnx import helper

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    known_outputs = {o.name for o in probe.graph.output}
    typed = {vi.name: vi for vi in probe.graph.value_info}
    wanted = [n for n in names if n not in known_outputs and n in typed]
    probe.graph.output.extend(typed[n] for n in wanted)
    initializers = {init.name for init in probe.graph.initializer}
    feeds = {}
    for vi in probe.graph.input:
        if vi.name in initializers:
            continue
        shape = [d.dim_value for d in vi.type.tensor_type.shape.dim]
        if any(d <= 0 for d in shape):
            return {}
        dtype = helper.tensor_dtype_to_np_dtype(vi.type.tensor_type.elem_type)
        feeds[vi.name] = np.zeros(shape, dtype=dtype)
    session = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    output_names = [o.name for o in session.get_outputs()]
    values = session.run(None, feeds)
    return {n: list(v.shape) for n, v in zip(output_names, values, strict=True) if n in names}


def profile_onnx(path: str | Path, top: int | None = None, imgsz: int | tuple[int, int] | None = None) -> Profile:
    """Params (initializer elements), MACs and a per-node table read from an ONNX file.

    Shapes come from `onnx.shape_inference` (with data propagation); where a Conv/Gemm/MatMul shape is still
    unknown, one onnxruntime run on zeros supplies it. A symbolic batch dim counts as 1; symbolic H/W need
    `imgsz`. Exporters fold BatchNorm into the preceding Conv (BN's scale and shift disappear, a conv bias
    appears), and may share identical initializers, so parameters differ slightly from PyTorch's count.
    """
    import onnx

    from edgedeploy.errors import InputError

    path = Path(path)
    if not path.is_file():
        raise InputError(f"ONNX file not found: {path}")
    try:
        model = onnx.load(str(path))
        initializer_sizes = {init.name: _numel(list(init.dims)) for init in model.graph.initializer}
        _pin_input_dims(model, set(initializer_sizes), None if imgsz is None else image_hw(imgsz))
        model = onnx.shape_inference.infer_shapes(model, data_prop=True)
    except Exception as e:  # onnx raises several unrelated exception types for a bad file
        raise InputError(f"{path} is not a readable ONNX model ({type(e).__name__}: {e})") from e

    shapes = _onnx_shapes(model)
    nodes = list(model.graph.node)
    unresolved = [n for n in nodes if n.op_type in _MAC_OPS and not _node_macs(n, shapes)]
    if unresolved:
        needed = sorted({name for n in unresolved for name in (n.input[0], n.output[0])})
        try:
            shapes.update(_shapes_by_running(model, needed))
        except Exception:  # an op onnxruntime cannot run on CPU: keep the static counts and say so below
            pass

    layers = []
    for i, node in enumerate(nodes):
        params = sum(initializer_sizes.get(inp, 0) for inp in node.input)
        out_shape = shapes.get(node.output[0]) if node.output else None
        layers.append(
            LayerStats(node.name or f"{node.op_type}_{i}", node.op_type, out_shape, params, _node_macs(node, shapes))
        )

    graph_input = next((vi for vi in model.graph.input if vi.name not in initializer_sizes), None)
    in_shape = shapes.get(graph_input.name) if graph_input is not None else None
    size = (in_shape[-2], in_shape[-1]) if in_shape and len(in_shape) == 4 else (0, 0)
    still_unknown = [r.name for r, n in zip(layers, nodes, strict=True) if n.op_type in _MAC_OPS and not r.macs]
    notes = []
    if still_unknown:
        notes.append(
            f"{len(still_unknown)} Conv/Gemm/MatMul nodes have unknown shapes and count 0 MACs "
            f"(e.g. {still_unknown[0]}); pass --imgsz or export with static input sizes"
        )
    profile = Profile(
        params=sum(initializer_sizes.values()),
        macs=sum(r.macs for r in layers),
        imgsz=size,
        peak_activation_bytes=0,
        layers=layers,
        source="onnx",
        notes=notes,
    )
    if top:
        profile.layers = profile.top(top)
    return profile
