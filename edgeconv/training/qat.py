"""Quantization-aware training (``edgeconv train --qat``): fine-tune a trained run with fake quantization and write
the QDQ graph whose scales and zero points came from that training (``qat.onnx`` beside ``model.pt``).

How, with PyTorch's own tools (torch 2.14; ``prepare_qat``/``prepare_qat_fx`` are deprecated there, and their fused
Conv-BN QAT modules export batch-norm arithmetic around the convolution instead of one quantized Conv):
- batch norms are folded into the convolutions before them (fine-tuning keeps their statistics frozen anyway);
- every Conv/Linear weight goes through a ``torch.ao.quantization.FakeQuantize`` (per-channel symmetric int8,
  7-bit values [-64, 63]); activations through per-tensor uint8 ``FakeQuantize`` modules with moving-average
  min/max observers, at the points ONNX Runtime runs as int8: the model's input, each activation's output
  (Conv+ReLU/ReLU6 are one quantized op), a Conv/Linear output that is not followed by an activation, a block's
  output made by an addition, and whatever feeds a Conv/Linear through averaging; biases are int32 with scale
  input scale x weight scale, as ONNX Runtime's QLinearConv computes them;
- a few batches set the first ranges, the whole network trains for ``--qat-epochs`` (ranges frozen for the last
  epoch when there are two or more) and the epoch with the best validation loss is kept;
- the export writes those very values: QuantizeLinear/DequantizeLinear with the learned scales, int8 weight and
  int32 bias initializers behind DequantizeLinear, input ``input`` NCHW float32 with a dynamic batch, output
  ``logits`` float32 (no QDQ on it).

Why 7-bit weights: ONNX Runtime's U8S8 kernels on AVX2 CPUs without VNNI add pairs of u8 x s8 products in int16
with saturation (255*127 + 255*127 overflows); with weights in [-64, 63] a pair is at most 255*64*2 = 32,640, so
the graph gives the same answers on every x86 CPU by construction. Training lets the network adapt to the coarser
weights (the alternative, 7-bit activations, costs the same bit on the side with the larger range).
"""
from __future__ import annotations

import copy
import json
import logging
import shutil
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.ao.quantization import FakeQuantize, MovingAverageMinMaxObserver, MovingAveragePerChannelMinMaxObserver

from edgeconv_runtime.errors import EdgeconvError
from edgeconv_runtime.fileio import atomic_write_json

log = logging.getLogger("edgeconv.qat")

QAT_ONNX = "qat.onnx"
METADATA_KEY = "edgeconv.qat"
WEIGHT_QMIN, WEIGHT_QMAX = -64, 63  # 7-bit weights: no int16 overflow in AVX2's u8 x s8 pair sums
ACT_QMIN, ACT_QMAX = 0, 255  # uint8 activations, asymmetric (ONNX Runtime's U8S8)
INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1
CALIBRATION_BATCHES = 8  # batches that set the first ranges before training
AGREEMENT_IMAGES = 128  # validation images on which the written graph must agree with PyTorch's fake quantization
ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.Hardtanh, nn.LeakyReLU, nn.ELU, nn.Hardswish, nn.Hardsigmoid, nn.SiLU, nn.GELU, nn.Sigmoid, nn.Tanh)
# ops whose output lies on the grid of their input (a quantized tensor stays quantized through them)
TRANSPARENT = (nn.Identity, nn.Dropout, nn.Dropout2d, nn.Flatten, nn.MaxPool2d, nn.ZeroPad2d)


# --------------------------------------------------------------------------------------------- the QAT model


def _act_fake_quant() -> FakeQuantize:
    return FakeQuantize(observer=MovingAverageMinMaxObserver, quant_min=ACT_QMIN, quant_max=ACT_QMAX, dtype=torch.quint8,
                        qscheme=torch.per_tensor_affine)


def _weight_fake_quant() -> FakeQuantize:
    return FakeQuantize(observer=MovingAveragePerChannelMinMaxObserver, quant_min=WEIGHT_QMIN, quant_max=WEIGHT_QMAX, dtype=torch.qint8,
                        qscheme=torch.per_channel_symmetric, ch_axis=0)


class ActQuant(nn.Module):
    """One activation's uint8 fake quantizer; at export a QuantizeLinear/DequantizeLinear pair with its learned values."""

    def __init__(self):
        super().__init__()
        self.fq = _act_fake_quant()
        self.exporting = False

    @property
    def qparams(self) -> tuple:
        return float(self.fq.scale), int(self.fq.zero_point)

    def forward(self, x):
        if self.exporting:
            return _ActQDQ.apply(x, *self.qparams)
        return self.fq(x)


class QuantConv(nn.Module):
    """A Conv2d or Linear with fake-quantized weights and int32-rounded bias. ``grid`` is the activation quantizer
    its input lies on (shared with the op that produced it); ``requant``: at export, repeat that Q/DQ pair at this
    input because grid-preserving ops (max pool, flatten, padding) stand between them."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer
        self.weight_fq = _weight_fake_quant()
        self.own_input: Optional[ActQuant] = None  # set when no quantized producer was found upstream
        self._grid: list = []  # [ActQuant], unregistered: it belongs to the producer
        self.requant = False
        self.exporting = False

    @property
    def grid(self) -> Optional[ActQuant]:
        return self.own_input if self.own_input is not None else (self._grid[0] if self._grid else None)

    def _bias_scale(self) -> torch.Tensor:
        return self.grid.fq.scale.detach() * self.weight_fq.scale.detach()

    def forward(self, x):
        if self.own_input is not None:
            x = self.own_input(x)
        elif self.exporting and self.requant:
            x = _ActQDQ.apply(x, *self.grid.qparams)
        w, b = self.layer.weight, self.layer.bias
        if self.exporting:
            w, b = _ConstDQ.apply(w, id(self), "weight"), (_ConstDQ.apply(b, id(self), "bias") if b is not None else None)
        else:
            w = self.weight_fq(w)
            if b is not None and self.grid is not None and bool(self.weight_fq.fake_quant_enabled):
                s = self._bias_scale()
                b = b + (torch.clamp(torch.round(b / s), INT32_MIN, INT32_MAX) * s - b).detach()  # straight-through
        if isinstance(self.layer, nn.Linear):
            return F.linear(x, w, b)
        if hasattr(self.layer, "pad"):  # timm's TF "same" convolution fixed for the input size: a zero pad first
            pad = self.layer.pad
            x = _ZeroPad.apply(x, tuple(pad.padding)) if self.exporting and isinstance(pad, nn.ZeroPad2d) else pad(x)
        return self.layer._conv_forward(x, w, b)

    def export_constants(self) -> dict:
        """{'weight': (int8 values, per-channel scale, dequantized), 'bias': (int32 values, scale, dequantized)}."""
        fq = self.weight_fq
        scale = fq.scale.detach().float()
        w = self.layer.weight.detach()
        shape = (-1,) + (1,) * (w.dim() - 1)
        wq = torch.fake_quantize_per_channel_affine(w, scale, fq.zero_point.detach().int(), 0, WEIGHT_QMIN, WEIGHT_QMAX)
        q = torch.round(wq / scale.view(shape)).to(torch.int8)
        out = {"weight": (q, scale, q.float() * scale.view(shape))}
        if self.layer.bias is not None:
            s = self._bias_scale().float()
            qb = torch.clamp(torch.round(self.layer.bias.detach() / s), INT32_MIN, INT32_MAX).to(torch.int32)
            out["bias"] = (qb, s, qb.float() * s)
        return out


_EXPORT_CONSTANTS: dict = {}  # (id(QuantConv), 'weight'|'bias') -> (integer values, scale, dequantized), during export only


class _ActQDQ(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scale: float, zero_point: int):
        return torch.fake_quantize_per_tensor_affine(x, scale, zero_point, ACT_QMIN, ACT_QMAX)

    @staticmethod
    def symbolic(g, x, scale: float, zero_point: int):
        s = g.op("Constant", value_t=torch.tensor(scale, dtype=torch.float32))
        z = g.op("Constant", value_t=torch.tensor(zero_point, dtype=torch.uint8))
        return g.op("DequantizeLinear", g.op("QuantizeLinear", x, s, z), s, z)


class _ZeroPad(torch.autograd.Function):
    """A zero pad exported as one Pad with constant pads (the Conv after it absorbs it), not the exporter's pads arithmetic."""

    @staticmethod
    def forward(ctx, x, padding: tuple):
        return F.pad(x, padding)

    @staticmethod
    def symbolic(g, x, padding: tuple):
        left, right, top, bottom = padding
        return g.op("Pad", x, g.op("Constant", value_t=torch.tensor([0, 0, top, left, 0, 0, bottom, right], dtype=torch.int64)), mode_s="constant")


class _ConstDQ(torch.autograd.Function):
    """A weight or bias as integer constants behind a per-channel DequantizeLinear (axis 0, zero points 0)."""

    @staticmethod
    def forward(ctx, t, key: int, kind: str):
        return _EXPORT_CONSTANTS[(key, kind)][2].to(t.dtype)

    @staticmethod
    def symbolic(g, t, key: int, kind: str):
        q, scale, _ = _EXPORT_CONSTANTS[(key, kind)]
        return g.op("DequantizeLinear", g.op("Constant", value_t=q), g.op("Constant", value_t=scale),
                    g.op("Constant", value_t=torch.zeros(scale.shape, dtype=q.dtype)), axis_i=0)


def _quantizers(model: nn.Module, kind: type) -> list:
    return [m for m in model.modules() if isinstance(m, kind)]


def set_observers(model: nn.Module, on: bool) -> None:
    for m in model.modules():
        if isinstance(m, FakeQuantize):
            m.enable_observer(on)


def set_fake_quant(model: nn.Module, on: bool) -> None:
    for m in model.modules():
        if isinstance(m, FakeQuantize):
            m.enable_fake_quant(on)


class QatModel(nn.Module):
    """The folded float network with its quantizers: ``acts`` holds every activation quantizer (hooks apply them)."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net
        self.acts = nn.ModuleList()
        self.plan: dict = {}

    def forward(self, x):
        return self.net(x)


# ------------------------------------------------------------------------------------- tracing and folding


@dataclass
class _Call:
    module: nn.Module
    inputs: list
    output: Optional[int]
    path: str = ""


@dataclass
class _Trace:
    calls: list
    model_in: int
    model_out: int
    keep: list = field(default_factory=list)  # the traced tensors stay alive so their ids stay unique


def _trace(model: nn.Module, x: torch.Tensor) -> _Trace:
    """Every module call of one eval forward, in the order calls finish (children before their parents)."""
    names = {m: n for n, m in model.named_modules()}
    calls, keep = [], [x]

    def hook(m, args, out):
        calls.append(_Call(m, [id(a) for a in args if isinstance(a, torch.Tensor)], id(out) if isinstance(out, torch.Tensor) else None, names.get(m, "")))
        keep.extend([*args, out])

    hooks = [m.register_forward_hook(hook) for m in model.modules() if not isinstance(m, (FakeQuantize, ActQuant))]
    try:
        with torch.no_grad():
            out = model.eval()(x)
    finally:
        for h in hooks:
            h.remove()
    keep.append(out)
    return _Trace(calls, id(x), id(out), keep)


def _no_inplace(model: nn.Module) -> None:
    """In-place activations return their input tensor; the tracing below tells tensors apart by identity."""
    for m in model.modules():
        if isinstance(getattr(m, "inplace", None), bool):
            m.inplace = False


def _bn_replacement(bn: nn.Module) -> nn.Module:
    """What is left of a batch norm once folded: timm's BatchNormAct2d keeps its dropout and activation."""
    rest = [m for m in (getattr(bn, "drop", None), getattr(bn, "act", None)) if m is not None and not isinstance(m, nn.Identity)]
    if not rest:
        return nn.Identity()
    return rest[0] if len(rest) == 1 else nn.Sequential(*rest)


@torch.no_grad()
def fold_batchnorm(model: nn.Module, x: torch.Tensor) -> int:
    """Fold every eval-mode batch norm that directly follows a convolution into it; returns how many were folded."""
    tr = _trace(model, x)
    convs = {c.output: c for c in tr.calls if isinstance(c.module, nn.Conv2d)}
    uses: dict = {}
    for c in tr.calls:
        for i in c.inputs:
            uses[i] = uses.get(i, 0) + 1
    parents = {m: (p, name) for p in model.modules() for name, m in p.named_children()}
    folded = 0
    for c in tr.calls:
        bn = c.module
        if not isinstance(bn, nn.modules.batchnorm._BatchNorm) or not c.inputs or c.inputs[0] not in convs:
            continue
        conv = convs[c.inputs[0]].module
        if uses.get(c.inputs[0], 0) != 1 or bn not in parents:
            continue
        factor = (bn.weight if bn.affine else torch.ones_like(bn.running_var)) / torch.sqrt(bn.running_var + bn.eps)
        shift = bn.bias if bn.affine else torch.zeros_like(bn.running_mean)
        bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
        conv.weight = nn.Parameter(conv.weight * factor.view(-1, 1, 1, 1))
        conv.bias = nn.Parameter((bias - bn.running_mean) * factor + shift)
        parent, name = parents[bn]
        setattr(parent, name, _bn_replacement(bn))
        folded += 1
    return folded


def _wrap_layers(model: nn.Module) -> None:
    """Every Conv2d and Linear becomes a QuantConv around itself."""
    for parent in list(model.modules()):
        if isinstance(parent, QuantConv):
            continue
        for name, child in list(parent.named_children()):
            if isinstance(child, (nn.Conv2d, nn.Linear)):
                setattr(parent, name, QuantConv(child))


def _is_unit(m: nn.Module) -> bool:
    """A module the plan reasons about as one op (the rest are containers)."""
    return isinstance(m, (QuantConv, *ACTIVATIONS, *TRANSPARENT)) or not any(True for _ in m.children())


def _plan(qm: QatModel, x: torch.Tensor) -> dict:
    """Place the activation quantizers (see the module docstring) and give every QuantConv its input grid."""
    tr = _trace(qm.net, x)
    units = [c for c in tr.calls if _is_unit(c.module)]
    producer: dict = {}
    for c in units:
        if c.output is not None:
            producer.setdefault(c.output, c)  # an identity op returns its input: the first producer is the real one
    for c in tr.calls:  # a container's output made by a functional op (a residual addition)
        if c.output is not None and c.output not in producer and c.output not in (tr.model_out, tr.model_in):
            producer[c.output] = c
    consumers: dict = {}
    for c in units:
        for i in c.inputs:
            consumers.setdefault(i, []).append(c)
    quantized: dict = {}  # id(module) -> the call whose output gets an ActQuant

    def mark(c: _Call) -> None:
        if c.output != tr.model_out:
            quantized[id(c.module)] = c

    for c in tr.calls:
        m = c.module
        if isinstance(m, ACTIVATIONS):
            mark(c)
        elif isinstance(m, QuantConv):
            after = consumers.get(c.output, [])
            if not (after and all(isinstance(a.module, ACTIVATIONS) for a in after)):
                mark(c)
        elif not _is_unit(m) and producer.get(c.output) is c:
            mark(c)
    grids: dict = {}  # id(QuantConv) -> ('input' | the quantized call | None, requant)
    for c in units:
        if not isinstance(c.module, QuantConv) or id(c.module) in grids:
            continue
        t, hops = c.inputs[0], 0
        while True:
            if t == tr.model_in:
                grids[id(c.module)] = ("input", hops > 0)
                break
            p = producer.get(t)
            if p is None:
                grids[id(c.module)] = (None, False)
                break
            if id(p.module) in quantized and quantized[id(p.module)] is p:
                grids[id(c.module)] = (p, hops > 0)
                break
            if isinstance(p.module, TRANSPARENT) and p.inputs:
                t, hops = p.inputs[0], hops + 1
                continue
            mark(p)  # averaging, a functional op: quantize its output for this layer
            grids[id(c.module)] = (p, hops > 0)
            break
    return {"trace": tr, "quantized": quantized, "grids": grids}


def _install(qm: QatModel, plan: dict) -> dict:
    """Create the ActQuant modules and the hooks that apply them; returns counts for the record."""
    by_call: dict = {}
    for c in plan["quantized"].values():
        aq = ActQuant()
        qm.acts.append(aq)
        by_call[id(c.module)] = aq
        c.module.register_forward_hook(lambda m, args, out, aq=aq: aq(out))
    input_q = None
    counts = {"activations": len(by_call), "layers": 0, "input_quantizers": 0, "requantized_inputs": 0}
    for m in qm.net.modules():
        if not isinstance(m, QuantConv):
            continue
        counts["layers"] += 1
        where, requant = plan["grids"].get(id(m), (None, False))
        if where == "input":
            if input_q is None:
                input_q = ActQuant()
                qm.acts.append(input_q)
                qm.net.register_forward_pre_hook(lambda mod, args, aq=input_q: (aq(args[0]), *args[1:]))
                counts["activations"] += 1
            m._grid, m.requant = [input_q], requant
        elif where is None:  # no quantized producer found: this layer quantizes its own input
            m.own_input = ActQuant()
            counts["input_quantizers"] += 1
        else:
            m._grid, m.requant = [by_call[id(where.module)]], requant
        counts["requantized_inputs"] += int(requant)
    return counts


def build_qat_model(model: nn.Module, sample: torch.Tensor) -> QatModel:
    """A fake-quantized copy of the trained ``model`` (eval mode, float weights): folded, wrapped, planned."""
    net = copy.deepcopy(model).eval()
    _no_inplace(net)
    with torch.no_grad():
        ref = net(sample)
    folded = fold_batchnorm(net, sample)
    with torch.no_grad():
        diff = float((net(sample) - ref).abs().max())
    if diff > 1e-3 * max(1.0, float(ref.abs().max())):
        raise EdgeconvError(f"folding batch norms into the convolutions changed the outputs by {diff:.3g}; this model cannot be trained with --qat")
    _wrap_layers(net)
    qm = QatModel(net)
    set_fake_quant(qm, False)
    set_observers(qm, False)
    plan = _plan(qm, sample)
    counts = _install(qm, plan)
    qm.plan = {"folded_batchnorms": folded, **counts}
    return qm


# ------------------------------------------------------------------------------------------------ export


def export_qat_onnx(qm: QatModel, input_shape: tuple, path: Path, opset: int = 17, metadata: Optional[dict] = None) -> None:
    """The learned quantization as a QDQ graph: ``input`` NCHW float32 (dynamic batch) -> ``logits`` float32."""
    import onnx

    from edgeconv_export.onnx import INPUT_NAME, OUTPUT_NAME

    qm = qm.eval()
    convs = _quantizers(qm, QuantConv)
    acts = _quantizers(qm, ActQuant)
    _EXPORT_CONSTANTS.clear()
    for c in convs:
        for kind, v in c.export_constants().items():
            _EXPORT_CONSTANTS[(id(c), kind)] = v
    for m in (*convs, *acts):
        m.exporting = True
    net_cl = next(qm.parameters()).is_contiguous(memory_format=torch.channels_last) and next(qm.parameters()).dim() == 4
    try:
        qm.to(memory_format=torch.contiguous_format)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(qm, (torch.zeros(1, *input_shape),), str(path), input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                              dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}}, opset_version=opset,
                              do_constant_folding=True, dynamo=False)
    except Exception as exc:
        raise EdgeconvError(f"exporting the QAT graph failed: {str(exc).splitlines()[0][:200]}") from exc
    finally:
        for m in (*convs, *acts):
            m.exporting = False
        _EXPORT_CONSTANTS.clear()
        if net_cl:
            qm.to(memory_format=torch.channels_last)
    model = onnx.load(str(path))
    _constants_to_initializers(model.graph)
    _fold_pads(model.graph)
    _drop_unused_initializers(model.graph)
    if metadata:
        entry = model.metadata_props.add()
        entry.key, entry.value = METADATA_KEY, json.dumps(metadata)
    model.producer_name = "edgeconv"
    onnx.save(model, str(path))
    onnx.checker.check_model(str(path), full_check=True)


def _constants_to_initializers(graph) -> None:
    """Constant nodes (the exporter's form of our scales, zero points and integer weights) as initializers, named by
    what they feed, as ONNX Runtime's and TensorRT's QDQ tools expect."""
    from onnx import numpy_helper

    const = {n.output[0]: n for n in graph.node if n.op_type == "Constant" and len(n.attribute) == 1 and n.attribute[0].name == "value"}
    names = {}
    for n in graph.node:
        if n.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            continue
        for k, i in enumerate(n.input):
            if i in const and i not in names:
                names[i] = f"{n.output[0]}_{('x', 'scale', 'zero_point')[k]}"
    keep = []
    for n in graph.node:
        if n.op_type == "Constant" and n.output[0] in names:
            t = numpy_helper.to_array(n.attribute[0].t)
            graph.initializer.append(numpy_helper.from_array(t, names[n.output[0]]))
        else:
            keep.append(n)
    del graph.node[:]
    graph.node.extend(keep)
    for n in graph.node:
        for k, i in enumerate(n.input):
            if i in names:
                n.input[k] = names[i]


def _fold_pads(graph) -> None:
    """A zero, constant-mode, spatial-only Pad feeding only a Conv becomes the Conv's own pads, so the Conv reads the
    DequantizeLinear directly (the QLinearConv pattern)."""
    import onnx
    from onnx import numpy_helper

    inits = {t.name: t for t in graph.initializer}
    consts = {n.output[0]: n for n in graph.node if n.op_type == "Constant"}
    uses: dict = {}
    for n in graph.node:
        for i in n.input:
            uses[i] = uses.get(i, 0) + 1

    def value(name):
        if name in inits:
            return numpy_helper.to_array(inits[name])
        if name in consts:
            return numpy_helper.to_array(consts[name].attribute[0].t)
        return None

    pads = {n.output[0]: n for n in graph.node if n.op_type == "Pad"}
    drop = set()
    for n in graph.node:
        if n.op_type != "Conv" or n.input[0] not in pads or uses.get(n.input[0]) != 1:
            continue
        p = pads[n.input[0]]
        mode = next((a.s.decode() for a in p.attribute if a.name == "mode"), "constant")
        amounts = value(p.input[1]) if len(p.input) > 1 else None
        fill = value(p.input[2]) if len(p.input) > 2 and p.input[2] else np.zeros(1)
        if mode != "constant" or amounts is None or fill is None or np.any(fill != 0) or len(amounts) != 8 or np.any(amounts[[0, 1, 4, 5]] != 0) \
                or np.any(amounts < 0):
            continue
        old = next((list(a.ints) for a in n.attribute if a.name == "pads"), [0, 0, 0, 0])
        new = [int(old[0] + amounts[2]), int(old[1] + amounts[3]), int(old[2] + amounts[6]), int(old[3] + amounts[7])]
        for a in list(n.attribute):
            if a.name in ("pads", "auto_pad"):
                n.attribute.remove(a)
        n.attribute.append(onnx.helper.make_attribute("pads", new))
        n.input[0] = p.input[0]
        drop.add(id(p))
    keep = [n for n in graph.node if id(n) not in drop]
    del graph.node[:]
    graph.node.extend(keep)


def _drop_unused_initializers(graph) -> None:
    used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    keep = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep)
    live = [n for n in graph.node if n.op_type != "Constant" or any(o in used for o in n.output)]
    del graph.node[:]
    graph.node.extend(live)


def read_qat_metadata(path: Path) -> dict:
    """The record ``export_qat_onnx`` stored in a QAT graph (empty when there is none)."""
    import onnx

    m = onnx.load(str(path), load_external_data=False)
    for p in m.metadata_props:
        if p.key == METADATA_KEY:
            return json.loads(p.value)
    return {}


# ---------------------------------------------------------------------------------------------- training


@dataclass
class QatSettings:
    """What `edgeconv train --qat` takes besides the run: epochs, learning rate (default the run's --lr / 100)."""

    epochs: int = 2
    lr: Optional[float] = None
    threads: Optional[int] = None
    progress: bool = True
    images: Optional[int] = None  # training images per epoch (a seeded sample; default all)

    def check(self) -> None:
        if self.epochs < 1:
            raise EdgeconvError(f"--qat-epochs must be at least 1, got {self.epochs}")
        if self.images is not None and self.images < 1:
            raise EdgeconvError(f"--qat-images must be at least 1, got {self.images}")
        if self.lr is not None and not self.lr > 0:
            raise EdgeconvError(f"--qat-lr must be positive, got {self.lr}")


def qat_from_run(run_dir: str | Path, settings: QatSettings, dataset=None) -> dict:
    """Fine-tune ``run_dir``'s model.pt with fake quantization; writes RUN/qat.onnx and metrics.json's ``qat`` record.

    Validation (each epoch, and the figures recorded) runs the exported QDQ graph in ONNX Runtime: what ships, and
    far cheaper than fake quantization in PyTorch; the two are checked to agree on the first validation images."""
    import tempfile

    from .. import checkpoint as ckpt
    from ..augment import build_augmentation
    from .config import TrainConfig
    from .loaders import InMemoryLoader
    from .loop import Hooks, Plan, Step, evaluate, fit, make_optimizer
    from .rundir import seed_everything

    settings.check()
    path = ckpt.resolve_checkpoint(Path(run_dir))
    ck = ckpt.load_checkpoint(path)
    out = path.parent
    cfg = TrainConfig(**{**ck["train_config"], "progress": settings.progress}).resolved()
    if settings.threads:
        torch.set_num_threads(settings.threads)
    if dataset is None:
        from .datasets import load_training_data

        dataset = load_training_data(cfg)
    model, pre = ckpt.model_from_checkpoint(ck)
    if list(dataset.classes) != list(ck["classes"]):
        raise EdgeconvError(f"{cfg.data} now has classes {dataset.classes}, but {path} was trained on {ck['classes']}")
    seed_everything(cfg.seed)
    t0 = time.perf_counter()
    channels_last = cfg.channels_last and pre.channels == 3
    bs = cfg.batch_size
    train = dataset.train
    if settings.images is not None and settings.images < len(train.labels):
        train = train.subset(np.sort(np.random.default_rng(cfg.seed).choice(len(train.labels), settings.images, replace=False)))
    val = InMemoryLoader(dataset.val, pre, 32)
    sample = next(iter(InMemoryLoader(dataset.val, pre, 2)))[0]
    qm = build_qat_model(model, sample)
    if channels_last:
        qm = qm.to(memory_format=torch.channels_last)
    # first ranges: a few training batches through the model with observers on, fake quantization on (in order, so
    # each layer sees the quantized output of the one before)
    set_fake_quant(qm, True)
    set_observers(qm, True)
    qm.eval()
    with torch.no_grad():
        for _, (x, _y) in zip(range(CALIBRATION_BATCHES), InMemoryLoader(train, pre, bs, shuffle=True, seed=cfg.seed + 7, channels_last=channels_last)):
            qm(x)
    set_observers(qm, False)
    float_acc = ck.get("val_accuracy")
    if float_acc is None:
        float_acc = evaluate(model, val, nn.CrossEntropyLoss())["accuracy"]
    lr = settings.lr if settings.lr is not None else cfg.lr / 100
    loader = InMemoryLoader(train, pre, bs, shuffle=True, seed=cfg.seed + 11, augment=build_augmentation(cfg.augment_preset), channels_last=channels_last)
    opt = make_optimizer(cfg.optimizer, [p for p in qm.parameters() if p.requires_grad], lr, 0.0)
    epoch_no = {"n": 0}
    metadata = {"checkpoint_weights_sha256": ck.get("weights_sha256"), "epochs": settings.epochs, "lr": lr,
                "weight_range": [WEIGHT_QMIN, WEIGHT_QMAX], "activation_range": [ACT_QMIN, ACT_QMAX]}
    with tempfile.TemporaryDirectory(prefix="edgeconv-qat-") as tmpdir:
        best = {"graph": Path(tmpdir) / "best.onnx", "state": None}
        trial = Path(tmpdir) / "epoch.onnx"

        def set_train() -> None:
            epoch_no["n"] += 1
            qm.train()
            # ranges learn while the weights move, then stay fixed for the last epoch so the weights settle on them
            set_observers(qm, not (settings.epochs >= 2 and epoch_no["n"] == settings.epochs))

        def validate() -> dict:
            set_observers(qm, False)
            export_qat_onnx(qm, pre.input_shape, trial, metadata=metadata)
            return _ort_evaluate(trial, val)

        def on_improve(epoch: int, v: dict) -> None:
            trial.replace(best["graph"])
            best["state"] = copy.deepcopy(qm.state_dict())

        start = validate()
        on_improve(0, start)
        seed = {"history": [], "best": {"val_loss": start["loss"], "val_accuracy": start["accuracy"], "epoch": 0}, "bad_epochs": 0}
        f = fit(Step(qm, opt, nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)), loader, Hooks(set_train, validate, on_improve),
                Plan(settings.epochs, label="qat epoch", progress=settings.progress), resume=seed)
        qm.load_state_dict(best["state"])
        set_observers(qm, False)
        final = _ort_evaluate(best["graph"], val)
        agreement = _onnx_check(qm, best["graph"], InMemoryLoader(dataset.val, pre, 32), AGREEMENT_IMAGES)
        tmp = out / f".{QAT_ONNX}.new"
        shutil.copyfile(_with_metadata(best["graph"], {**metadata, "best_epoch": f.best["epoch"]}), tmp)
        tmp.replace(out / QAT_ONNX)
    record = {
        "file": QAT_ONNX,
        "epochs": settings.epochs,
        "epochs_run": len(f.history),
        "best_epoch": f.best["epoch"],
        "lr": lr,
        "optimizer": cfg.optimizer,
        "train_images_per_epoch": int(len(train.labels)),
        "interrupted": f.interrupted,
        "val_images": int(len(dataset.val.labels)),
        "val_accuracy_float": float_acc,
        "val_accuracy_int8_before": start["accuracy"],
        "val_accuracy_int8": final["accuracy"],
        "val_loss_int8": final["loss"],
        "fake_quant_top1_agreement": agreement,
        "fake_quant_agreement_images": min(AGREEMENT_IMAGES, int(len(dataset.val.labels))),
        "weights": f"int8 per-channel symmetric, 7-bit values [{WEIGHT_QMIN}, {WEIGHT_QMAX}]",
        "activations": f"uint8 per-tensor asymmetric [{ACT_QMIN}, {ACT_QMAX}]",
        "bias": "int32, scale = input scale x weight scale",
        "quantizers": qm.plan,
        "history": f.history,
        "seconds": round(time.perf_counter() - t0, 3),
    }
    metrics_path = out / "metrics.json"
    metrics = json.loads(metrics_path.read_text()) if metrics_path.exists() else {}
    metrics["qat"] = record
    atomic_write_json(metrics_path, metrics)
    return record


def _with_metadata(path: Path, metadata: dict) -> Path:
    """``path`` with its edgeconv.qat record replaced by ``metadata`` (the best epoch is known only at the end)."""
    import onnx

    m = onnx.load(str(path))
    for p in m.metadata_props:
        if p.key == METADATA_KEY:
            p.value = json.dumps(metadata)
    onnx.save(m, str(path))
    return path


def _ort_evaluate(path: Path, loader) -> dict:
    """Loss and accuracy of an ONNX graph (ONNX Runtime, CPU) over a loader."""
    from edgeconv_runtime.backends import create_backend

    backend = create_backend("onnxruntime-cpu", str(path))
    loss, correct, n = 0.0, 0, 0
    try:
        for x, y in loader:
            logits = torch.from_numpy(np.asarray(backend.infer(np.ascontiguousarray(x.numpy())), dtype=np.float32))
            loss += float(F.cross_entropy(logits, y, reduction="sum"))
            correct += int((logits.argmax(1) == y).sum())
            n += len(y)
    finally:
        backend.close()
    return {"loss": loss / max(n, 1), "accuracy": correct / max(n, 1), "n": n}


def _onnx_check(qm: QatModel, path: Path, loader, images: int) -> float:
    """Top-1 agreement of the written graph (ONNX Runtime) with PyTorch's fake quantization on the first ``images``
    validation images: the graph must run what training simulated."""
    from edgeconv_export.onnx import ort_logits

    xs, refs, seen = [], [], 0
    qm.eval()
    with torch.no_grad():
        for x, _ in loader:
            xs.append(x.contiguous().numpy())
            refs.append(qm(x).numpy())
            seen += len(x)
            if seen >= images:
                break
    x, ref = np.concatenate(xs)[:images], np.concatenate(refs)[:images]
    agree = float((ort_logits(path, x).argmax(1) == ref.argmax(1)).mean())
    if agree < 0.98:
        raise EdgeconvError(f"the exported QAT graph agrees with its fake-quantized PyTorch model on only {100 * agree:.1f} % of "
                            f"{len(x)} validation images; not written")
    return agree
