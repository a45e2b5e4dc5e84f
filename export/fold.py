"""Constant folding of the shape arithmetic in ONNX graphs, with onnx's reference evaluator.

torch.onnx (the TorchScript exporter) writes `F.pad` with a list of ints as a small
subgraph that reverses the list at run time (ConstantOfShape, Concat, Slice with step -1,
Transpose, Cast) and cannot fold it itself ("Only steps=1 can be constant folded").
onnx's shape inference then loses every shape after the Pad, so nothing downstream has a
static shape. EfficientNet's TensorFlow-style "same" padding (`Conv2dStaticSamePadding`)
is one Pad per strided convolution. Folding turns each such subgraph into the initializer
it always computes; no float work on the image changes.
"""
from __future__ import annotations

import numpy as np

NONDETERMINISTIC = {"RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike", "Multinomial",
                    "Bernoulli"}
MAX_ELEMENTS = 1 << 20  # a folded tensor larger than this stays computed (keeps the file small)


def constant_nodes(graph) -> list:
    """Indices of nodes computed from initializers and Constant nodes alone (graph order)."""
    known = {t.name for t in graph.initializer}
    inputs = {i.name for i in graph.input} - known
    found = []
    for i, node in enumerate(graph.node):
        if node.op_type in NONDETERMINISTIC or any(a.g.node or a.graphs for a in node.attribute):
            continue
        if all((not name) or (name in known and name not in inputs) for name in node.input):
            found.append(i)
            known.update(o for o in node.output if o)
    return found


def fold_constants(model):
    """A copy of `model` with every constant node but Constant replaced by initializers
    (Constant nodes read only by folded nodes go too). Returns (model, folded count)."""
    import copy

    import onnx
    from onnx import helper, numpy_helper
    from onnx.reference import ReferenceEvaluator

    model = copy.deepcopy(model)
    g = model.graph
    idx = constant_nodes(g)
    todo = [i for i in idx if g.node[i].op_type != "Constant"]
    if not todo:
        return model, 0
    # Constant nodes that the rest of the graph reads stay (a later rewrite of one leaves
    # no unused initializer behind); those read only by folded nodes go with them.
    rest = [n for i, n in enumerate(g.node) if i not in set(todo)]
    read = {name for n in rest if n.op_type != "Constant" for name in n.input} | {o.name for o in g.output}
    chosen = set(todo) | {i for i in idx if g.node[i].op_type == "Constant" and not set(g.node[i].output) & read}
    consumed_later = {name for i, n in enumerate(g.node) if i not in chosen for name in n.input}
    consumed_later |= {o.name for o in g.output}
    wanted = [o for i in todo for o in g.node[i].output if o in consumed_later]
    sub = helper.make_graph([g.node[i] for i in idx], "fold", [], [helper.make_tensor_value_info(o, 0, None)
                                                                   for o in wanted], list(g.initializer))
    sub_model = helper.make_model(sub, opset_imports=list(model.opset_import))
    values = ReferenceEvaluator(sub_model).run(None, {})
    big = {o for o, v in zip(wanted, values) if np.asarray(v).size > MAX_ELEMENTS}
    if big:  # keep the nodes (and their constant ancestors) of large results as they are
        return model, 0
    existing = {t.name for t in g.initializer}
    for name, value in zip(wanted, values):
        if name not in existing:
            g.initializer.append(numpy_helper.from_array(np.asarray(value), name))
    keep = [n for i, n in enumerate(g.node) if i not in chosen]
    del g.node[:]
    g.node.extend(keep)
    onnx.checker.check_model(model)
    return model, len(todo)
