"""The user's preprocessing, written into the graph: one input layout for every export.

Every explicam model takes `image` (N, H, W, 3) float32 RGB in [0, 1]. A model from
elsewhere wants something else: 0..255 or 0..1, a mean and std per channel, BGR or grey,
NCHW. Rather than teach the runtime, the video loop, the evaluation's perturbations and
the embedded script each of those conventions, the export puts them in front of the
original graph as a few element-wise ops (a 224x224 image: ~0.15M multiply-adds against
the network's hundreds of millions), and records them in the metadata for the reader:

    value = (pixel * scale - mean) / std,   pixel = 255 * image, per channel, then layout

`Preprocess.numpy(images)` is the same arithmetic in numpy (runtime/preprocess.py): the
export's self-check feeds the original file with it, and RISE on a plain classifier
(runtime/plain.py) preprocesses with it.
"""
from __future__ import annotations

import json
import os

import numpy as np

# The arithmetic lives in the runtime (the plain-classifier path applies it in numpy);
# the export writes the same steps as ONNX ops and re-exports the names.
from explicam.runtime.preprocess import GREY, Preprocess, eval_fraction, parse_floats  # noqa: F401

IMAGE = "image"


def add_prologue(proto, original_input: str, pre: Preprocess, hw) -> None:
    """Replace the graph input `original_input` by `image` (N, H, W, 3) followed by the
    preprocessing ops, in place."""
    from onnx import TensorProto, helper, numpy_helper

    g = proto.graph
    a, b = pre.affine()
    nodes, x = [], IMAGE

    def const(name, value):
        g.initializer.append(numpy_helper.from_array(np.asarray(value), f"explicam_pre_{name}"))
        return f"explicam_pre_{name}"

    def op(kind, inputs, name, **attrs):
        nonlocal x
        out = f"explicam_pre_{name}_out"
        nodes.append(helper.make_node(kind, inputs, [out], name=f"explicam_pre_{name}", **attrs))
        x = out

    if pre.channels == "bgr":
        op("Gather", [x, const("bgr", np.array([2, 1, 0], np.int64))], "bgr", axis=3)
    elif pre.channels == "gray":
        op("MatMul", [x, const("grey", np.asarray(GREY, np.float32)[:, None])], "grey")
    nchw = pre.layout == "nchw"
    if nchw:   # the transpose first: onnxruntime broadcasts a per-channel (1, 3, 1, 1) constant over
        # whole planes, and a (3,) one over the last axis pixel by pixel: on a 224x224 image the
        # Mul and the Add took 0.45 ms that way, 0.04 ms this way (ResNet-50's forward: 1.03x the
        # original file's, 1.01x now)
        op("Transpose", [x], "nchw", perm=[0, 3, 1, 2])
    shape = (1, -1, 1, 1) if nchw else (-1,)
    if np.any(a != 1):
        op("Mul", [x, const("scale", np.reshape(a, shape))], "scale")
    if np.any(b != 0):
        op("Add", [x, const("shift", np.reshape(b, shape))], "shift")
    if not nchw and x == IMAGE:
        op("Identity", [x], "nhwc")
    for node in g.node:  # the original graph now reads the prologue's output
        node.input[:] = [x if name == original_input else name for name in node.input]
    for out in g.output:
        if out.name == original_input:
            raise ValueError(f"the graph input '{original_input}' is also an output; nothing to explain")
    keep = [i for i in g.input if i.name != original_input]
    del g.input[:]
    g.input.extend([helper.make_tensor_value_info(IMAGE, TensorProto.FLOAT, ["N", int(hw[0]), int(hw[1]), 3])]
                   + keep)
    old = list(g.node)
    del g.node[:]
    g.node.extend(nodes + old)


def read_labels(path: str, count: int) -> list:
    """Class names from one name per line, a JSON list, or ImageNet synset lines
    (`n01440764 tench, Tinca tinca` -> `tench`); the count must match the model's."""
    if not os.path.isfile(path):
        raise ValueError(f"--labels: no such file {path}")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if text.lstrip().startswith("["):
        try:
            names = [str(n) for n in json.loads(text)]
        except ValueError as exc:
            raise ValueError(f"--labels {path}: not a valid JSON list ({exc})") from None
    else:
        names = []
        for line in text.splitlines():
            line = line.strip()
            if not line:
                continue
            head, _, rest = line.partition(" ")
            if rest and len(head) == 9 and head[0] == "n" and head[1:].isdigit():
                line = rest.split(",")[0].strip()  # the synset's first name
            names.append(line)
    if len(names) != count:
        raise ValueError(f"--labels {path}: {len(names)} names for a model with {count} outputs")
    return names
