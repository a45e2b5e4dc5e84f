"""Several feature layers in one export: `export --layer a,b,c`.

The first layer listed is the primary one (outputs `features`, `grads`, what single-layer
methods use by default); the others follow as features_1 / grads_1, features_2 / grads_2 ...
in the order given, from the same backward walk (autodiff.gradient_model). A layer is an
ONNX tensor name, a Keras layer name (for .keras / .h5 files), `auto` (the last
convolutional stage, pick_features below), or `auto:K`: auto and the K - 1 stages before it,
each stage's end being the last tensor of the convolution chain at one spatial resolution
that all of the score's dependence on the image passes through (ResNet's layer4, layer3 ...;
the seed's conv4, conv3 ...), the layers Layer-CAM fuses (Jiang et al. 2021, section III-C).
"""
from __future__ import annotations

import onnx

from .graph import CHAIN_OPS, FLOAT_TYPES, Graph, GraphError, ancestors, float_dependents


def parse_layers(spec: str) -> list[str]:
    """'auto' -> ['auto']; 'a, b' -> ['a', 'b']; an empty item is an error."""
    items = [s.strip() for s in str(spec or "auto").split(",")]
    if not all(items):
        raise GraphError(f"--layer {spec!r}: an empty layer name")
    for item in items:
        if item.startswith("auto:") and not (item[5:].isdigit() and int(item[5:]) >= 1):
            raise GraphError(f"--layer {item!r}: expected auto:K with K >= 1 (auto and the K - 1 stages before it)")
    return items


def named_layers(items) -> list[str]:
    """The items that name a layer (not auto / auto:K)."""
    return [i for i in items if i != "auto" and not i.startswith("auto:")]


def stages(g: Graph, count: int) -> list[str]:
    """The auto layer, then the ends of up to count - 1 earlier resolution stages, deepest first."""
    auto = pick_features(g, "auto")
    cands = feature_candidates(g)
    producer = {o: n for n in g.model.graph.node for o in n.output}
    consumers = {}
    for node in g.model.graph.node:
        for i in node.input:
            consumers.setdefault(i, []).append(node)

    def hw(name):
        s = g.shapes[name]
        return (s[2], s[3]) if g.layouts.get(name) == "NCHW" else (s[1], s[2])
    last = {}   # spatial size -> the last cut tensor of the chain at that size, before the auto layer
    for name in cands[:cands.index(auto)]:
        if producer[name].op_type in CHAIN_OPS and hw(name) != hw(auto) and is_cut(g, name, consumers):
            last[hw(name)] = name
    earlier = sorted(last.values(), key=cands.index, reverse=True)
    return [auto] + earlier[:count - 1]


def resolve_layers(g: Graph, items, named: dict | None = None) -> list[tuple[str, str]]:
    """(name, tensor) for the parsed --layer items, primary first: the name is the one given
    (a Keras layer's, or a tensor's), or the tensor's for auto and auto:K (`named`: Keras layer
    name -> tensor). A tensor named twice is an error."""
    out = []
    for item in items:
        if item == "auto":
            found = [pick_features(g, "auto")]
        elif item.startswith("auto:"):
            found = stages(g, int(item[5:]))
        else:
            found = [pick_features(g, (named or {}).get(item, item))]
        out += [(t if item.startswith("auto") else item, t) for t in found]
    tensors = [t for _, t in out]
    if len(set(tensors)) != len(tensors):
        raise GraphError(f"--layer {','.join(items)}: the same tensor is named twice ({', '.join(tensors)})")
    return out


def _spatial(g: Graph, name: str) -> bool:
    shape, lay = g.shapes.get(name), g.layouts.get(name)
    if shape is None or len(shape) != 4 or lay is None:
        return False
    h, w = (shape[2], shape[3]) if lay == "NCHW" else (shape[1], shape[2])
    return h > 1 and w > 1


def is_cut(g: Graph, name: str, consumers: dict) -> bool:
    """True when every float path from the image to the score passes through `name`."""
    seen, stack = {g.input}, [g.input]
    while stack:
        for node in consumers.get(stack.pop(), ()):
            for o in node.output:
                if o == g.score:
                    return False
                if o and o != name and o not in seen and g.dtypes.get(o, onnx.TensorProto.FLOAT) in FLOAT_TYPES:
                    seen.add(o)
                    stack.append(o)
    return True


def feature_candidates(g: Graph) -> list[str]:
    """Spatial tensors (H, W > 1) on the way from the image to the score, in graph order."""
    on_path = float_dependents(g.model.graph.node, [g.input], g.dtypes) & ancestors(g.model, g.score)
    return [o for n in g.model.graph.node for o in n.output if o in on_path and _spatial(g, o)]


def pick_features(g: Graph, layer: str = "auto") -> str:
    """The feature tensor: `auto` (the last spatial tensor of the convolution chain that all
    the score's dependence on the image passes through) or a tensor name, checked."""
    cands = feature_candidates(g)
    producer = {o: n for n in g.model.graph.node for o in n.output}

    def listing():
        return ", ".join(f"{c} {list(g.shapes[c])}" for c in cands[-6:]) or "none"
    if layer != "auto":
        if layer not in cands:
            why = "is not in the model" if layer not in g.shapes else "is not a spatial map the score depends on"
            raise GraphError(f"tensor '{layer}' {why}; spatial tensors near the output: {listing()}")
        return layer
    consumers = {}
    for node in g.model.graph.node:
        for i in node.input:
            consumers.setdefault(i, []).append(node)
    for name in reversed(cands):
        if producer[name].op_type in CHAIN_OPS and is_cut(g, name, consumers):
            return name
    raise GraphError(f"no tensor with spatial extent above 1 on both sides comes from a convolution before "
                     f"'{g.output}'; not a convolutional image classifier (or pass --layer NAME)")
