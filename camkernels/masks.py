"""RISE's per-pixel sum: sum_k w_k M_k over a chunk of masks (runtime/methods_perturb.py), and
Integrated Gradients' path sum sum_k w_k g_k, added up call by call into one float64
accumulator (runtime/methods_input.py), then times x - x'.

numpy's `w @ masks` is a BLAS matrix-vector product, and on the 2-core box OpenBLAS took
7-8 ms for 32 masks of 224x224 (its threads wait for cores the onnxruntime call holds),
against 0.5 ms for this loop; RISE makes one such sum per 32 forward passes. Both twins
accumulate in float64 in mask order and round once to float32 (kernels.py's convention).
"""
from __future__ import annotations

import numpy as np

from explicam.camkernels.kernels import _jit


@_jit
def mask_weighted_sum_nb(masks, weights):
    k, n = masks.shape
    acc = np.zeros(n, np.float64)
    for i in range(k):
        w = np.float64(weights[i])
        for j in range(n):
            acc[j] += w * masks[i, j]
    return acc.astype(np.float32)


def mask_weighted_sum_np(masks, weights):
    acc = np.zeros(masks.shape[1], np.float64)
    for i in range(masks.shape[0]):  # mask order, as the numba twin (an axpy per mask, no BLAS)
        acc += np.float64(weights[i]) * masks[i]
    return acc.astype(np.float32)


@_jit
def path_accumulate_nb(acc, grads, weights):
    k, n = grads.shape
    for i in range(k):   # point order, each point one pass (32x faster than numpy's temporaries)
        w = weights[i]
        for j in range(n):
            acc[j] += w * grads[i, j]


def path_accumulate_np(acc, grads, weights):
    for i in range(grads.shape[0]):
        acc += weights[i] * grads[i]
