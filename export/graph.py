"""Reading an image classifier's ONNX graph: what to feed, what to explain, where to look.

`prepare()` loads a model file safely, fixes its spatial size, makes its batch dynamic and
finds (or says in one line why it cannot) the image input and its layout (NCHW or NHWC: the
axis of size 1 or 3 is the channels), the output to explain, the score (the input of a final
Softmax, LogSoftmax or Sigmoid when there is one: the pre-activation score Grad-CAM
differentiates) and every tensor's static shape at batch 1 and layout. `pick_features()`
(export/layers.py) then chooses the feature tensor (`auto` or a tensor name). Only onnx and numpy here.
"""
from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .fold import fold_constants

MAX_TENSOR_BYTES = 4 << 30   # one tensor at batch 1; a classifier's largest is a few hundred MB
FLOAT_TYPES = (onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16,
               onnx.TensorProto.BFLOAT16)
# Ops whose output can be the feature map: a convolution and its activation, normalisation or
# residual chain. Pooling is not among them: VGG's and the seed's last max pool comes after
# the map Grad-CAM uses (the last convolution's activation).
CHAIN_OPS = {"Conv", "ConvTranspose", "BatchNormalization", "InstanceNormalization", "Relu", "LeakyRelu",
             "PRelu", "Clip", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "Elu", "Selu", "Softplus",
             "Mul", "Add", "Sum", "Div", "Concat"}
NCHW_OPS = {"Conv", "ConvTranspose", "MaxPool", "AveragePool", "LpPool", "BatchNormalization", "LRN",
            "InstanceNormalization", "GlobalAveragePool", "GlobalMaxPool", "Resize", "Upsample"}
LAYOUT_KEEPING_OPS = CHAIN_OPS - {"Conv", "ConvTranspose"} | {"Identity", "Dropout", "Split", "Slice", "Pad",
                                                            "Sub", "Neg", "Exp", "Softmax", "Cast", "Where"}


class GraphError(ValueError):
    """A model explicam cannot differentiate as it is; the message is one line."""


@dataclass
class Graph:
    model: onnx.ModelProto      # static spatial size, batch dynamic ("N"), no value_info
    input: str                  # the image input
    layout: str                 # "NCHW" or "NHWC", of the image input
    output: str                 # the explained graph output
    score: str                  # the differentiated tensor (N, classes)
    activation: str | None      # "Softmax", "LogSoftmax", "Sigmoid" between score and output, or None
    shapes: dict                # tensor name -> static shape at batch 1
    dtypes: dict                # tensor name -> onnx elem type
    layouts: dict = field(default_factory=dict)   # rank-4 tensor -> "NCHW" / "NHWC" where known
    opset: int = 13
    batch_fixed: bool = False   # the file's own input had batch fixed to 1


def opset_of(model) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def _inside(base: str, location: str) -> bool:
    if os.path.isabs(location):
        return False
    root = os.path.realpath(base)
    return os.path.commonpath([root, os.path.realpath(os.path.join(root, location))]) == root


def _declared_bytes(dims, elem_type) -> int:
    size = onnx.helper.tensor_dtype_to_np_dtype(elem_type).itemsize if elem_type else 4
    return int(np.prod([max(int(d), 0) for d in dims], dtype=np.float64)) * size


def load_model(source, max_tensor_bytes: int = MAX_TENSOR_BYTES) -> onnx.ModelProto:
    """A ModelProto from a path, bytes or a ModelProto (copied). External data is read only
    from inside the model's folder, and a tensor declared larger than `max_tensor_bytes` is
    refused before anything is allocated for it."""
    if isinstance(source, onnx.ModelProto):
        model, base = copy.deepcopy(source), None
    elif isinstance(source, (bytes, bytearray)):
        model, base = _parse(bytes(source), "the given bytes"), None
    else:
        path = os.fspath(source)
        if not os.path.isfile(path):
            raise GraphError(f"no model file at {path}")
        with open(path, "rb") as f:
            model, base = _parse(f.read(), path), os.path.dirname(os.path.abspath(path))
    external = []
    for tensor in model.graph.initializer:
        if _declared_bytes(tensor.dims, tensor.data_type) > max_tensor_bytes:
            raise GraphError(f"initializer '{tensor.name}' declares shape {list(tensor.dims)}, more than "
                             f"{max_tensor_bytes >> 20} MiB: refused")
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            info = {e.key: e.value for e in tensor.external_data}
            if base is None:
                raise GraphError(f"initializer '{tensor.name}' keeps its data in an external file; load the model "
                                 "from its path")
            if not _inside(base, info.get("location", "")):
                raise GraphError(f"initializer '{tensor.name}' points outside the model's folder "
                                 f"({info.get('location')!r}): refused")
            external.append(tensor)
    if external:
        onnx.external_data_helper.load_external_data_for_model(model, base)
    return model


def _parse(data: bytes, what: str) -> onnx.ModelProto:
    try:
        return onnx.load_from_string(data)
    except Exception as exc:  # protobuf raises DecodeError and friends
        raise GraphError(f"{what} is not an ONNX model: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None


def constant_values(model) -> dict:
    """Tensor name -> numpy value, for initializers and Constant nodes."""
    values = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant" and node.attribute:
            a = node.attribute[0]
            value = helper.get_attribute_value(a)
            values[node.output[0]] = numpy_helper.to_array(value) if a.name == "value" else np.asarray(value)
    return values


def _dims(value_info) -> list:
    shape = value_info.type.tensor_type.shape
    return [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in shape.dim]


def _set_dims(value_info, dims) -> None:
    shape = value_info.type.tensor_type.shape
    shape.ClearField("dim")
    for d in dims:
        entry = shape.dim.add()
        if isinstance(d, str):
            entry.dim_param = d
        else:
            entry.dim_value = int(d)


def infer_shapes(model) -> tuple[dict, dict]:
    """(name -> static shape or None, name -> elem type) by onnx shape inference."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model, check_type=False, strict_mode=False, data_prop=True)
    except Exception as exc:
        raise GraphError(f"shape inference failed: {str(exc).splitlines()[0]}") from None
    shapes, dtypes, g = {}, {}, inferred.graph
    for vi in list(g.input) + list(g.value_info) + list(g.output):
        t = vi.type.tensor_type
        dtypes[vi.name] = t.elem_type
        dims = _dims(vi) if t.HasField("shape") else None
        shapes[vi.name] = None if dims is None or None in dims else tuple(dims)
    for init in g.initializer:
        shapes[init.name], dtypes[init.name] = tuple(init.dims), init.data_type
    return shapes, dtypes


def float_dependents(nodes, sources, dtypes) -> set:
    """Float tensors computed from `sources` by `nodes` (in graph order); shape and index
    outputs carry no gradient, so the dependence stops there."""
    dep = set(sources)
    for node in nodes:
        if any(i in dep for i in node.input):
            dep.update(o for o in node.output if o and dtypes.get(o, onnx.TensorProto.FLOAT) in FLOAT_TYPES)
    return dep


def ancestors(model, target) -> set:
    """Tensors that `target` is computed from, through float inputs (and itself)."""
    producer = {o: n for n in model.graph.node for o in n.output}
    seen, stack = {target}, [target]
    while stack:
        node = producer.get(stack.pop())
        if node is not None:
            for i in node.input:
                if i and i not in seen:
                    seen.add(i)
                    stack.append(i)
    return seen


def _image_input(model) -> onnx.ValueInfoProto:
    inits = {t.name for t in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in inits]
    images = [i for i in inputs if len(i.type.tensor_type.shape.dim) == 4
              and i.type.tensor_type.elem_type in FLOAT_TYPES]
    if len(images) != 1:
        listed = ", ".join(f"{i.name} {_dims(i)}" for i in inputs) or "none"
        raise GraphError(f"the model needs one 4-D float image input; its inputs: {listed}")
    return images[0]


def _input_layout(model, image, dims, layout: str) -> str:
    if layout.lower() in ("nchw", "nhwc"):
        return layout.upper()
    if layout.lower() != "auto":
        raise GraphError(f"layout must be auto, nchw or nhwc, not {layout!r}")
    first, last = dims[1] in (1, 3), dims[3] in (1, 3)
    if first != last:
        return "NCHW" if first else "NHWC"
    for node in model.graph.node:  # both or neither look like channels: tf2onnx opens NHWC with a Transpose
        if image.name in node.input:
            perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), None)
            if node.op_type == "Transpose" and perm == [0, 3, 1, 2]:
                return "NHWC"
            if node.op_type == "Conv":
                return "NCHW"
    raise GraphError(f"cannot tell the layout of input '{image.name}' {dims}; pass --layout nchw or nhwc")


def _pick_output(model, output: str | None) -> str:
    names = [o.name for o in model.graph.output]
    if output is None:
        if len(names) != 1:
            raise GraphError(f"the model has {len(names)} outputs ({', '.join(names)}); pass --output NAME")
        return names[0]
    if output not in names:
        raise GraphError(f"the model has no output named '{output}'; its outputs: {', '.join(names)}")
    return output


def _find_score(model, output: str) -> tuple[str, str | None]:
    producer = {o: n for n in model.graph.node for o in n.output}
    name = output
    while name in producer and producer[name].op_type == "Identity":
        name = producer[name].input[0]
    node = producer.get(name)
    if node is not None and node.op_type in ("Softmax", "LogSoftmax", "Sigmoid"):
        return node.input[0], node.op_type
    return name, None


def _check_sizes(shapes, dtypes, max_tensor_bytes) -> None:
    for name, shape in shapes.items():
        if shape is not None and _declared_bytes(shape, dtypes.get(name)) > max_tensor_bytes:
            raise GraphError(f"tensor '{name}' would have shape {list(shape)} at batch 1, more than "
                             f"{max_tensor_bytes >> 20} MiB: refused")


def _dynamic_batch(model, image, shapes1, dtypes) -> int:
    """Rewrite Reshapes whose constant shape hard-codes batch 1 (torch's x.view(x.size(0), -1)
    traced at batch 1): the leading 1 becomes 0, which copies the batch from the data."""
    values, count = constant_values(model), 0
    dep = float_dependents(model.graph.node, [image.name], dtypes)
    for node in model.graph.node:
        if node.op_type != "Reshape" or node.input[0] not in dep or node.input[1] not in values:
            continue
        if any(a.name == "allowzero" and a.i for a in node.attribute):
            continue
        target = np.array(values[node.input[1]], np.int64).reshape(-1)
        data = shapes1.get(node.input[0])
        if target.size and target[0] == 1 and data and data[0] == 1:
            target[0] = 0
            name = f"{node.input[1]}__batch_dynamic"
            if name not in values:
                model.graph.initializer.append(numpy_helper.from_array(target, name))
                values[name] = target
            node.input[1] = name
            count += 1
    return count


def _check_batch_axis(model, image, shapes1, shapes2, dtypes) -> None:
    """Every float tensor computed from the image must keep the batch on axis 0."""
    dep = float_dependents(model.graph.node, [image], dtypes)
    for node in model.graph.node:
        for o in node.output:
            if o not in dep or shapes1.get(o) is None or shapes2.get(o) is None:
                continue
            s1, s2 = shapes1[o], shapes2[o]
            if not s1 or s1[0] != 1 or s2 != (2, *s1[1:]):
                raise GraphError(f"node '{node.name}' ({node.op_type}) gives '{o}' shape {list(s1)} at batch 1 and "
                                 f"{list(s2)} at batch 2: it hard-codes the batch size, so the model cannot be made "
                                 "batch-dynamic")


def tensor_layouts(model, image: str, layout: str, shapes: dict) -> dict:
    """Rank-4 tensor -> "NCHW"/"NHWC", propagated from the input through the ops that keep it."""
    lay = {image: layout}
    for node in model.graph.node:
        known = next((lay[i] for i in node.input if i in lay), None)
        if node.op_type in NCHW_OPS:
            out = "NCHW"
        elif node.op_type == "Transpose":
            perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), None)
            out = {("NCHW", (0, 2, 3, 1)): "NHWC", ("NHWC", (0, 3, 1, 2)): "NCHW"}.get((known, tuple(perm or ())))
            out = known if perm == [0, 1, 2, 3] else out
        else:
            out = known if node.op_type in LAYOUT_KEEPING_OPS else None
        for o in node.output:
            if out and shapes.get(o) is not None and len(shapes[o]) == 4:
                lay[o] = out
    return lay


def prepare(source, input_size=None, layout: str = "auto", output: str | None = None,
            max_tensor_bytes: int = MAX_TENSOR_BYTES) -> Graph:
    """Load and analyse an image classifier (see the module docstring). `input_size` (H, W)
    is required when the file's spatial size is dynamic."""
    # torch.onnx writes "same" padding as a run-time shape subgraph shape inference cannot
    # see through (EfficientNet): constants are folded first (outputs stay bit-identical)
    model, _ = fold_constants(load_model(source, max_tensor_bytes))
    if opset_of(model) < 13:
        try:
            model = onnx.version_converter.convert_version(model, 13)
        except Exception as exc:
            raise GraphError(f"opset {opset_of(model)} is older than 13 and could not be converted: "
                             f"{str(exc).splitlines()[0]}") from None
    image = _image_input(model)
    dims = _dims(image)
    lay = _input_layout(model, image, dims, layout)
    hw, c_axis = ((2, 3), 1) if lay == "NCHW" else ((1, 2), 3)
    size = tuple(dims[a] for a in hw)
    if None in size:
        if input_size is None:
            raise GraphError(f"input '{image.name}' has a dynamic spatial size "
                             f"{[d if d else '?' for d in dims]}; pass --input-size H,W")
        size = tuple(int(s) for s in input_size)
    elif input_size is not None and tuple(int(s) for s in input_size) != size:
        raise GraphError(f"input '{image.name}' is {size[0]}x{size[1]}; --input-size {input_size[0]},{input_size[1]} "
                         "does not match it")
    if dims[c_axis] is None:
        raise GraphError(f"input '{image.name}' has a dynamic channel count")
    out = _pick_output(model, output)
    batch_fixed = dims[0] == 1

    def at_batch(n):
        full = [n, 0, 0, 0]
        full[c_axis] = dims[c_axis]
        full[hw[0]], full[hw[1]] = size
        return full

    # Shapes at batch 1 (static) and 2 (to see which axis is the batch): old value_info and
    # declared output shapes are dropped, they would pin the batch to the exported one.
    del model.graph.value_info[:]
    for o in model.graph.output:
        o.type.tensor_type.ClearField("shape")
    _set_dims(image, at_batch(1))
    if _declared_bytes(at_batch(1), image.type.tensor_type.elem_type) > max_tensor_bytes:
        raise GraphError(f"input '{image.name}' at {size} needs more than {max_tensor_bytes >> 20} MiB: refused")
    shapes, dtypes = infer_shapes(model)
    _check_sizes(shapes, dtypes, max_tensor_bytes)
    if _dynamic_batch(model, image, shapes, dtypes):
        shapes, dtypes = infer_shapes(model)
    _set_dims(image, at_batch(2))
    shapes2, _ = infer_shapes(model)
    _check_batch_axis(model, image.name, shapes, shapes2, dtypes)
    _set_dims(image, at_batch("N"))
    for o in model.graph.output:
        if shapes.get(o.name) is not None:
            _set_dims(o, ["N", *shapes[o.name][1:]])

    score, activation = _find_score(model, out)
    if dtypes.get(score) not in FLOAT_TYPES or score not in float_dependents(model.graph.node, [image.name], dtypes):
        raise GraphError(f"output '{out}' is not a float tensor computed from the image")
    s = shapes.get(score)
    if s is None or len(s) < 2 or int(np.prod(s[1:])) != max(s[1:]):
        raise GraphError(f"the score '{score}' has shape {s}; expected (batch, classes)")
    return Graph(model, image.name, lay, out, score, activation, shapes, dtypes,
                 tensor_layouts(model, image.name, lay, shapes), opset_of(model), batch_fixed)
