"""Where each feature cell looks: receptive-field geometry from the graph itself.

Convention, per axis: input pixel i is centred at coordinate i and covers [i - 0.5, i + 0.5];
the receptive field of feature cell j is centred at stride * j + offset and spans `rf` px
(every tap of every kernel on the path). A plain bilinear stretch (cv2.resize,
camkernels.upsample_bilinear, pytorch-grad-cam) draws cell j of h cells over S px at
(j + 0.5) * S / h - 0.5: stride S / h, offset (S / h - 1) / 2 (`naive_geometry`).
The seed network (five stride-1 convolutions with TensorFlow's `same` padding, 2x2/2 pools
between them) is 16 j + 23 at any size, its stretch 16 j + 7.5: with an even kernel `same`
pads one more row after than before, so each convolution sees half a cell further on, and
over the five (strides 1, 2, 4, 8, 16 at the input) cells look 15.5 px further down and right
than they are drawn. The issue's "16 j + 8 + 15.5" counts pixel i as [i, i + 1]: same places.

`feature_geometry(model)` composes every op on the path from the image input to the feature
tensor of an ONNX ModelProto (any exporter; NCHW or NHWC, tf2onnx's Transposes followed):
Conv / MaxPool / AveragePool / LpPool (kernel_shape or the weight's shape, strides,
dilations, explicit pads or auto_pad SAME_UPPER / SAME_LOWER / VALID, the SAME pads from the
static input size: total = max((ceil(n / s) - 1) * s + (k - 1) * d + 1 - n, 0), the odd one
at the end for SAME_UPPER), Pad (shifts), element-wise ops, BatchNormalization, activations,
(De)QuantizeLinear (transparent), Transpose and the Reshape / Flatten / (Un)Squeeze that keep
both spatial axes intact (followed). Where branches meet (a residual Add, a DenseNet Concat,
a squeeze-excitation Mul) branches through a global pooling carry no position and are
ignored; the others normally agree on stride and offset (a ResNet's identity and 1x1
downsample branches have the main path's centres, its pads being symmetric) and the largest
field is kept; where they disagree the branch with the largest field (the main path, the
deepest DenseNet branch) is taken and `notes` says so. Anything else on the path
(ConvTranspose, Resize, DepthToSpace, a crop) raises GeometryError: the export then writes
no geometry and the runtime places naively. `geometry_from_keras(model, layer)` gives the
same numbers from a Keras chain's config: a cross-check. Imports onnx and numpy only.
"""
from __future__ import annotations

import math

import numpy as np

from .graph import constant_values

CONVENTION = ("cell j of the feature map is centred at stride * j + offset input pixels per axis [y, x]; "
              "pixel i covers [i - 0.5, i + 0.5]")
SPATIAL_OPS = ("Conv", "ConvInteger", "MaxPool", "AveragePool", "LpPool")
GLOBAL_OPS = ("GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool")
TRANSPARENT_OPS = {
    "Relu", "LeakyRelu", "PRelu", "Elu", "Selu", "Celu", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "Softplus",
    "Softsign", "Clip", "Gelu", "Mish", "Erf", "Abs", "Neg", "Exp", "Log", "Sqrt", "Reciprocal", "Floor", "Ceil",
    "Round", "Sign", "Identity", "Dropout", "Cast", "BatchNormalization", "InstanceNormalization", "LRN",
    "QuantizeLinear", "DequantizeLinear", "Add", "Sub", "Mul", "Div", "Pow", "Sum", "Max", "Min", "Mean", "Where",
    "Concat", "Softmax", "LayerNormalization", "ThresholdedRelu", "Shrink",
}
RESHAPES = ("Reshape", "Flatten", "Squeeze", "Unsqueeze")


class GeometryError(ValueError):
    """The path from the image to the features holds an op whose geometry is not handled."""


# ------------------------------------------------------------------ one axis
def same_pads(size, k: int, s: int, d: int = 1, upper: bool = True) -> tuple[int, int]:
    """(begin, end) padding of auto_pad SAME_UPPER (TensorFlow's 'same') or SAME_LOWER."""
    k_eff = (k - 1) * d + 1
    if size is None:
        if s != 1:
            raise GeometryError("SAME padding with a stride needs the static input size")
        total = k_eff - 1
    else:
        total = max((math.ceil(size / s) - 1) * s + k_eff - size, 0)
    small = total // 2
    return (small, total - small) if upper else (total - small, small)


def step(axis: list, k: int, s: int = 1, d: int = 1, pad_begin: int = 0, pad_end: int = 0,
         ceil_mode: bool = False) -> list:
    """Compose one sliding window onto an axis [stride, offset, rf, size]: output j sees
    input positions s j - pad_begin + d t, t = 0..k-1, centred at s j - pad_begin + d (k - 1) / 2."""
    stride, offset, rf, size = axis
    k_eff = (k - 1) * d + 1
    offset = offset + stride * (d * (k - 1) / 2 - pad_begin)
    rf = rf + stride * (k_eff - 1)
    if size is not None:
        span = (size + pad_begin + pad_end - k_eff) / s
        size = (math.ceil(span) if ceil_mode else math.floor(span)) + 1
        if size < 1:
            raise GeometryError(f"a window of {k_eff} px leaves nothing of {axis[3]} px")
    return [stride * s, offset, rf, size]


def shift(axis: list, pad_begin: int, pad_end: int = 0) -> list:
    stride, offset, rf, size = axis
    return [stride, offset - stride * pad_begin, rf, None if size is None else size + pad_begin + pad_end]


def _result(axes: list, source: str, input_size, notes=(), feature_axes=None) -> dict:
    out = {"convention": CONVENTION, "source": source,
           "stride": [float(a[0]) for a in axes], "offset": [float(a[1]) for a in axes],
           "rf": [int(round(a[2])) for a in axes],
           "input_size": [int(v) if v is not None else None for v in input_size],
           "feature_size": [a[3] for a in axes], "notes": list(notes)}
    if feature_axes is not None:
        out["feature_axes"] = list(feature_axes)
    return out


def naive_geometry(input_hw, feature_hw) -> dict:
    """The placement of a plain bilinear stretch: cell j at (j + 0.5) * S / h - 0.5."""
    axes = [[s / h, (s / h - 1) / 2, s / h, h] for s, h in zip(input_hw, feature_hw)]
    return _result(axes, "naive bilinear stretch", input_hw)


def placement_params(geometry: dict) -> tuple[float, float, float, float]:
    """(stride_y, offset_y, stride_x, offset_x) for camkernels.upsample_placed."""
    (sy, sx), (oy, ox) = geometry["stride"], geometry["offset"]
    return float(sy), float(oy), float(sx), float(ox)


# ------------------------------------------------------------------ Keras config
def geometry_from_keras(model, layer: str) -> dict:
    """The geometry of a Keras chain of layers up to `layer`, from the layers' config."""
    size = list(model.input_shape[1:3])
    axes = [[1.0, 0.0, 1, size[0]], [1.0, 0.0, 1, size[1]]]
    for lay in model.layers:
        kind, cfg = type(lay).__name__, lay.get_config()
        if kind in ("Conv2D", "DepthwiseConv2D", "SeparableConv2D", "MaxPooling2D", "AveragePooling2D"):
            if cfg.get("data_format") not in (None, "channels_last"):
                raise GeometryError(f"layer {lay.name}: only channels_last is handled")
            k = cfg.get("kernel_size") or cfg["pool_size"]
            s = cfg.get("strides") or k
            d = cfg.get("dilation_rate") or (1, 1)
            for i in range(2):
                if cfg["padding"] == "same":
                    pads = same_pads(axes[i][3], k[i], s[i], d[i], upper=True)
                elif cfg["padding"] == "valid":
                    pads = (0, 0)
                else:
                    raise GeometryError(f"layer {lay.name}: padding {cfg['padding']!r} is not handled")
                axes[i] = step(axes[i], k[i], s[i], d[i], *pads)
        elif kind == "ZeroPadding2D":
            for i, (b, e) in enumerate(cfg["padding"]):
                axes[i] = shift(axes[i], b, e)
        elif kind not in ("InputLayer", "Activation", "ReLU", "LeakyReLU", "BatchNormalization", "Dropout",
                          "Rescaling", "Normalization", "SpatialDropout2D", "Identity"):
            raise GeometryError(f"layer {lay.name} ({kind}) before {layer}: its geometry is not handled")
        if lay.name == layer:
            return _result(axes, f"keras config up to {layer}", size)
    raise GeometryError(f"model has no layer named {layer!r}")


# ------------------------------------------------------------------ ONNX graph
def _shapes(model) -> dict:
    """Static shapes (ints, None where unknown) of every tensor shape inference can tell."""
    import onnx

    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # shape inference refuses some custom graphs: shapes then stay unknown
        inferred = model
    g = inferred.graph
    out = {}
    for vi in list(g.input) + list(g.value_info) + list(g.output):
        t = vi.type.tensor_type
        if t.HasField("shape"):
            out[vi.name] = [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim]
    return out


def _attrs(node) -> dict:
    import onnx

    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _ancestors(graph, target: str) -> set:
    producer = {o: idx for idx, n in enumerate(graph.node) for o in n.output}
    seen, todo, nodes = set(), [target], set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        idx = producer.get(name)
        if idx is not None:
            nodes.add(idx)
            todo.extend(i for i in graph.node[idx].input if i)
    return nodes


def _image_layout(shape, layout: str) -> tuple[int, int]:
    if len(shape) != 4:
        raise GeometryError(f"the image input must have 4 dimensions, has shape {shape}")
    if layout == "auto":
        layout = "NHWC" if shape[3] in (1, 3, 4) and shape[1] not in (1, 3, 4) else "NCHW"
    return (1, 2) if layout == "NHWC" else (2, 3)


def _axis_map(in_shape, out_shape, pos) -> tuple | None:
    """Where an intact spatial axis of in_shape lands in out_shape (same length and the
    same number of elements after it), or None when a reshape splits or merges it."""
    if in_shape is None or out_shape is None:
        return None
    found = []
    for p in pos:
        after = in_shape[p + 1:]
        if in_shape[p] is None or any(v is None for v in after):
            return None
        want = int(np.prod(after))
        hit = [q for q in range(len(out_shape)) if out_shape[q] == in_shape[p] and all(
            v is not None for v in out_shape[q + 1:]) and int(np.prod(out_shape[q + 1:])) == want]
        if len(hit) != 1:
            return None
        found.append(hit[0])
    return tuple(found)


class _Walker:
    def __init__(self, model, image: str, feature: str, layout: str, input_size):
        self.g = model.graph
        self.consts = constant_values(model)
        self.shapes = _shapes(model)
        inputs = [i.name for i in self.g.input if i.name not in self.consts]
        self.image = image or (inputs[0] if inputs else None)
        if self.image not in self.shapes:
            raise GeometryError(f"no image input {self.image!r}; inputs are {inputs}")
        self.feature = feature
        shape = self.shapes[self.image]
        self.pos = _image_layout(shape, layout)
        size = list(input_size) if input_size is not None else [shape[p] for p in self.pos]
        self.input_size = size
        # a tensor's state: {"axes": [[stride, offset, rf, size]] for y, x, "pos": (py, px)} or "global"
        self.state = {self.image: {"axes": [[1.0, 0.0, 1, size[0]], [1.0, 0.0, 1, size[1]]], "pos": self.pos}}
        self.notes = []

    def run(self) -> dict:
        path = _ancestors(self.g, self.feature)
        if not any(self.feature in n.output for n in self.g.node) and self.feature != self.image:
            raise GeometryError(f"the graph has no tensor named {self.feature!r}")
        for idx, node in enumerate(self.g.node):
            if idx not in path:
                continue
            ins = [self.state[i] for i in node.input if i in self.state]
            if not ins:
                continue
            out = self.apply(node, ins)
            for o in node.output:
                if o:
                    self.state[o] = out
        st = self.state.get(self.feature)
        if st is None:
            raise GeometryError(f"{self.feature!r} does not depend on the image input {self.image!r}")
        if st == "global":
            raise GeometryError(f"{self.feature!r} has been pooled globally: it has no spatial layout")
        return _result(st["axes"], "onnx graph", self.input_size, self.notes, st["pos"])

    def merge(self, node, ins):
        spatial = [s for s in ins if s != "global"]
        if not spatial:
            return "global"
        first = spatial[0]
        agree = all(s["pos"] == first["pos"] and all(
            abs(a[0] - b[0]) < 1e-9 and abs(a[1] - b[1]) < 1e-9 for a, b in zip(s["axes"], first["axes"]))
            for s in spatial)
        if agree:
            axes = [[a[0], a[1], max(s["axes"][i][2] for s in spatial), a[3]] for i, a in enumerate(first["axes"])]
            return {"axes": axes, "pos": first["pos"]}
        best = max(spatial, key=lambda s: sum(a[2] for a in s["axes"]))
        self.notes.append(f"{node.op_type} {node.name or node.output[0]}: branches disagree on where cells look; "
                          "took the branch with the largest receptive field")
        return best

    def apply(self, node, ins):
        op, at = node.op_type, _attrs(node)
        if op in GLOBAL_OPS:
            return "global"
        data = self.state.get(node.input[0])
        if op in ("ReduceMean", "ReduceMax", "ReduceSum", "ReduceMin", "ReduceL2"):
            axes = at.get("axes")
            if axes is None and len(node.input) > 1:
                axes = self.consts.get(node.input[1])
            if data == "global" or axes is None:
                return "global"
            rank = len(self.shapes.get(node.input[0]) or [None] * 4)
            axes = {int(a) % rank for a in np.ravel(axes)}
            if set(data["pos"]) <= axes:
                return "global"
            if axes & set(data["pos"]) or not at.get("keepdims", 1):
                raise GeometryError(f"{op} {node.name}: a reduction over one spatial axis is not handled")
            return data
        if op == "Transpose":
            if data == "global":
                return data
            perm = list(at["perm"])
            return {"axes": data["axes"], "pos": tuple(perm.index(p) for p in data["pos"])}
        if op in RESHAPES:
            if data == "global":
                return data
            moved = _axis_map(self.shapes.get(node.input[0]), self.shapes.get(node.output[0]), data["pos"])
            if moved is None:
                raise GeometryError(f"{op} {node.name or node.output[0]}: cannot tell that it keeps the spatial "
                                    "axes (shapes unknown, or they are split or merged)")
            return {"axes": data["axes"], "pos": moved}
        if op == "Concat":
            rank = len(self.shapes.get(node.output[0]) or [None] * 4)
            spatial = [s for s in ins if s != "global"]
            if spatial and int(at.get("axis", 0)) % rank in spatial[0]["pos"]:
                raise GeometryError(f"Concat {node.name}: joining along a spatial axis is not handled")
            return self.merge(node, ins)
        if op == "Split" or op == "Slice":
            return self.slice(node, op, data, at)
        if op == "Pad":
            return self.pad(node, data, at)
        if op in SPATIAL_OPS:
            if node.input[0] not in self.state or data == "global":
                raise GeometryError(f"{op} {node.name}: the image reaches it only through its weights")
            return self.window(node, op, data, at)
        if op in TRANSPARENT_OPS:
            return self.merge(node, ins)
        raise GeometryError(f"{op} {node.name or node.output[0]} on the path from {self.image!r} to "
                            f"{self.feature!r}: its geometry is not handled")

    def slice(self, node, op, data, at):
        if data == "global":
            return data
        if op == "Split":
            axis = int(at.get("axis", 0))
        else:
            axes = self.consts.get(node.input[3]) if len(node.input) > 3 and node.input[3] else None
            rank = len(self.shapes.get(node.input[0]) or [None] * 4)
            axis = None if axes is None else {int(a) % rank for a in np.ravel(axes)}
            if axis is None or axis & set(data["pos"]):
                raise GeometryError(f"Slice {node.name}: a crop of the spatial axes is not handled")
            return data
        rank = len(self.shapes.get(node.input[0]) or [None] * 4)
        if axis % rank in data["pos"]:
            raise GeometryError(f"Split {node.name}: splitting a spatial axis is not handled")
        return data

    def pad(self, node, data, at):
        pads = at.get("pads")
        if pads is None and len(node.input) > 1:
            pads = self.consts.get(node.input[1])
        if pads is None:
            raise GeometryError(f"Pad {node.name}: its pads are not a constant")
        pads = [int(p) for p in np.ravel(pads)]
        rank = len(pads) // 2
        if len(node.input) > 3 and node.input[3]:
            raise GeometryError(f"Pad {node.name}: pads with an axes input are not handled")
        axes = [shift(a, pads[p], pads[p + rank]) for a, p in zip(data["axes"], data["pos"])]
        return {"axes": axes, "pos": data["pos"]}

    def window(self, node, op, data, at):
        if set(data["pos"]) != {2, 3}:
            raise GeometryError(f"{op} {node.name}: its input is not channels-first with both spatial axes "
                                f"at 2 and 3 (spatial axes at {data['pos']})")
        kernel = at.get("kernel_shape")
        if kernel is None:
            w = self.consts.get(node.input[1]) if len(node.input) > 1 else None
            shape = list(w.shape) if w is not None else self.shapes.get(node.input[1])
            if not shape or any(v is None for v in shape[2:]):
                raise GeometryError(f"{op} {node.name}: kernel shape unknown")
            kernel = shape[2:]
        if len(kernel) != 2:
            raise GeometryError(f"{op} {node.name}: only 2-D windows are handled")
        strides = at.get("strides") or [1, 1]
        dil = at.get("dilations") or [1, 1]
        pads = at.get("pads") or [0, 0, 0, 0]
        auto = at.get("auto_pad", b"NOTSET")
        auto = auto.decode() if isinstance(auto, bytes) else auto
        axes = [list(a) for a in data["axes"]]
        for conv_axis in range(2):  # ONNX windows run over axes 2 and 3 of their input
            i = data["pos"].index(2 + conv_axis)  # which of the image's axes (y = 0, x = 1) that is
            k, s, d = int(kernel[conv_axis]), int(strides[conv_axis]), int(dil[conv_axis])
            if auto in ("SAME_UPPER", "SAME_LOWER"):
                pb, pe = same_pads(axes[i][3], k, s, d, upper=auto == "SAME_UPPER")
            elif auto == "VALID":
                pb, pe = 0, 0
            else:
                pb, pe = int(pads[conv_axis]), int(pads[conv_axis + 2])
            axes[i] = step(axes[i], k, s, d, pb, pe, bool(at.get("ceil_mode", 0)))
        return {"axes": axes, "pos": data["pos"]}


def feature_geometry(model, feature: str = "features", image: str | None = None, layout: str = "auto",
                     input_size=None) -> dict:
    """Geometry of `feature` (a tensor name) with respect to the image input of an ONNX
    ModelProto: {"stride": [sy, sx], "offset": [oy, ox], "rf": [ry, rx], "input_size",
    "feature_size", "feature_axes" (where y and x sit in the feature tensor), "notes",
    "convention", "source"}. Raises GeometryError for a path it cannot follow.
    `image`: the input's name (default: the first graph input that is no initializer);
    `layout`: "NHWC", "NCHW" or "auto" (from the input's shape); `input_size` (h, w):
    where the graph leaves the spatial size open and SAME padding with a stride needs it."""
    return _Walker(model, image, feature, layout, input_size).run()


def geometry_for_metadata(model, feature: str = "features", log=print) -> dict | None:
    """feature_geometry for the export's metadata, or None (with one line saying why) when the
    path cannot be followed: the runtime then places the heatmaps naively."""
    try:
        return feature_geometry(model, feature)
    except GeometryError as exc:
        log(f"no receptive-field geometry in the metadata ({exc}); heatmaps will be placed naively")
        return None
