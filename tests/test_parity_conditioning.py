"""export/parity.cam_difference: a Grad-CAM that nearly cancels (a 2x2 conv4 at 32 px) is
judged on its terms' scale, not magnified by min-max normalisation; others as before."""
import numpy as np

from explicam.export.parity import cam_difference, gradcam_from_onnx_outputs, minmax


def test_near_cancelling_map_is_not_magnified():
    # two channels that cancel but for one cell: the map is [[0, 0], [0, 1e-6]] from terms of size 1
    feats = np.ones((2, 2, 2))
    feats[1, 1, 1] = 1 - 1e-6
    grads = np.broadcast_to(np.array([1.0, -1.0]), (2, 2, 2))
    ref = gradcam_from_onnx_outputs(feats[None], grads[None])[0]
    noisy = ref.copy()
    noisy[1, 0] = 1e-7  # float32 rounding of a sum of terms of size 1
    assert np.abs(minmax(noisy) - minmax(ref)).max() > 0.09  # what the normalised check alone sees
    assert cam_difference(noisy, ref, feats, grads) < 1e-6


def test_well_conditioned_map_compares_normalised():
    rng = np.random.default_rng(1)
    feats = rng.random((4, 4, 8))
    grads = np.abs(rng.normal(size=(4, 4, 8)))
    ref = gradcam_from_onnx_outputs(feats[None], grads[None])[0]
    other = ref.copy()
    other[0, 0] += 0.1 * (ref.max() - ref.min())
    assert cam_difference(other, ref, feats, grads) == np.abs(minmax(other) - minmax(ref)).max()
