"""model.blocks.onnx: the body's conv blocks one at a time, for Score-CAM's masked inputs.

Score-CAM runs the network on X * H_k for every channel k of conv4. Where H_k is zero
the masked image is zero, and an activation whose receptive field sees only zeros is the
zero image's activation: it need not be computed. runtime/masked.py therefore runs each
block only on the rectangle a mask can reach, inside the zero image's activations; on
the synthetic validation set that is about half the convolution work of a full pass.

The graph: inputs `block` () int64 and `x` (N, C, H, W) float32 NCHW, the block's input
already padded; output `y`, block b's Conv (no padding: the caller pads with the
right context) + ReLU (+ 2x2 MaxPool for conv0..conv3). An If chooses the block, so one
session holds all five and only the chosen branch runs.

Written only for the seed's body (conv0..conv4, 'same' padding, stride 1, ReLU, each
followed by 2x2 pooling but the last); for any other body it is not written and Score-CAM
runs whole masked images.
"""
from __future__ import annotations

import numpy as np

CONVS = ("conv0", "conv1", "conv2", "conv3", "conv4")


def block_layers(model, layer_name: str = "conv4"):
    """[(conv layer, pooled?)] for the seed's body ending at `layer_name`, else None."""
    if layer_name != CONVS[-1]:
        return None
    names = [layer.name for layer in model.layers]
    blocks = []
    for i, name in enumerate(CONVS):
        if name not in names:
            return None
        conv = model.get_layer(name)
        cfg = conv.get_config()
        square = len(set(cfg["kernel_size"])) == 1
        if (type(conv).__name__ != "Conv2D" or cfg["padding"] != "same" or tuple(cfg["strides"]) != (1, 1)
                or tuple(cfg["dilation_rate"]) != (1, 1) or cfg["activation"] != "relu" or not square):
            return None
        pooled = i < len(CONVS) - 1
        if pooled:
            nxt = model.layers[names.index(name) + 1]
            pcfg = nxt.get_config()
            if (type(nxt).__name__ != "MaxPooling2D" or tuple(pcfg["pool_size"]) != (2, 2)
                    or tuple(pcfg["strides"]) != (2, 2) or pcfg["padding"] != "valid"):
                return None
        blocks.append((conv, pooled))
    return blocks


def build_blocks(model, layer_name: str = "conv4", opset: int = 17):
    """(ModelProto, geometry dict) or (None, None) when the body is not the seed's."""
    from onnx import TensorProto, checker, helper, numpy_helper

    blocks = block_layers(model, layer_name)
    if blocks is None or len({tuple(c.get_config()["kernel_size"]) for c, _ in blocks}) != 1:
        return None, None

    def branch(b):
        conv, pooled = blocks[b]
        w, bias = conv.get_weights()
        p = f"b{b}_"
        inits = [numpy_helper.from_array(np.ascontiguousarray(w.transpose(3, 2, 0, 1), np.float32), p + "W"),
                 numpy_helper.from_array(np.asarray(bias, np.float32), p + "B")]
        nodes = [helper.make_node("Conv", ["x", p + "W", p + "B"], [p + "conv"], kernel_shape=list(w.shape[:2])),
                 helper.make_node("Relu", [p + "conv"], [p + "relu" if pooled else p + "y"])]
        if pooled:
            nodes.append(helper.make_node("MaxPool", [p + "relu"], [p + "y"], kernel_shape=[2, 2], strides=[2, 2]))
        out = helper.make_tensor_value_info(p + "y", TensorProto.FLOAT, ["n", "c", "h", "w"])
        return helper.make_graph(nodes, f"block{b}", [], [out], inits)

    def switch(b):  # if block == b: branch(b) else switch(b + 1); the last block is the final else
        if b == len(blocks) - 1:
            return branch(b)
        out = f"s{b}"
        nodes = [helper.make_node("Constant", [], [f"k{b}"], value=numpy_helper.from_array(np.array(b, np.int64))),
                 helper.make_node("Equal", ["block", f"k{b}"], [f"is{b}"]),
                 helper.make_node("If", [f"is{b}"], [out], then_branch=branch(b), else_branch=switch(b + 1))]
        return helper.make_graph(nodes, f"switch{b}", [], [helper.make_tensor_value_info(out, TensorProto.FLOAT,
                                                                                          ["n", "c", "h", "w"])])

    top = switch(0)
    graph = helper.make_graph(
        list(top.node), "explicam_blocks",
        [helper.make_tensor_value_info("block", TensorProto.INT64, []),
         helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", "c", "h", "w"])],
        [helper.make_tensor_value_info("s0", TensorProto.FLOAT, ["n", "c", "h", "w"])])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="explicam")
    proto.ir_version = min(proto.ir_version, 8)  # onnxruntime builds on boards lag behind onnx
    checker.check_model(proto)
    kernel = int(blocks[0][0].get_config()["kernel_size"][0])
    # Keras 'same' with an even kernel pads (K-1)//2 before and the rest after, as TensorFlow does
    geometry = {"kernel": kernel, "pad_before": (kernel - 1) // 2, "pad_after": kernel - 1 - (kernel - 1) // 2,
                "pooled": [bool(p) for _, p in blocks],
                "channels": [int(c.get_weights()[0].shape[2]) for c, _ in blocks]}
    return proto, geometry
