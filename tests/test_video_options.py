"""Video takes the method options of image explain (issue #14): --feature-layer, --placement
and the method options (here Finer-CAM's k and alpha) reach the stream's Explainers, through
StreamConfig and through the command line; each frame is then what an Explainer built with
the same options gives on it, and not what the defaults give."""
import cv2
import numpy as np
import pytest

from explicam.runtime import overlay as ov
from tests.conftest import run_cli
from tests.test_input_grads import _export_torch, _relu_net
from tests.test_video import Collect, read_frames, write_clip

torch = pytest.importorskip("torch", reason="torch makes the PyTorch test files (pip install torch==2.13.0)")
OPTIONS = {"finercam_k": 1, "finercam_alpha": 0.5}
FRAMES = 6
CASES = [("finercam", {"placement": "naive", "options": OPTIONS}), ("gradcam", {"feature_layer": "features_1"})]
ARGS = {"finercam": ["--finercam-k", 1, "--finercam-alpha", 0.5, "--placement", "naive"],
        "gradcam": ["--feature-layer", "features_1"]}


@pytest.fixture(scope="module")
def multi(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("vopts")
    res = _export_torch(tmp, _relu_net(3), layer="auto:3", input_grads=False)
    return res["onnx"], write_clip(tmp / "clip.avi", FRAMES)


def _expected(model, frames, method, **kw):
    """Each frame's overlay (alpha 0.5, jet) from an Explainer built with `kw`, fed as the loop feeds it."""
    from explicam.runtime.explainer import Explainer
    from explicam.runtime.video.loop import shrink_to_input

    ex = Explainer(model, batch_size=1, warmup=False, **kw)
    blender = ov.Blender(0.5, "jet")
    return [blender.blend(bgr, ex.explain(shrink_to_input(bgr, ex.input_hw, rgb=True), method).heatmaps[0])
            for bgr in frames]


@pytest.mark.parametrize("method,kw", CASES)
def test_stream_config_options_reach_the_explainers(multi, monkeypatch, method, kw):
    from explicam.runtime.video import StreamConfig, explain_stream
    from explicam.runtime.video import loop
    from explicam.runtime.video.capture import Source

    model, clip = multi
    got = []
    monkeypatch.setattr(loop, "make_sinks", lambda *a, **k: [Collect(got)])
    cfg = StreamConfig(model=str(model), method=method, labels=False, in_flight=1, **kw)
    res = explain_stream(Source(str(clip), "clip", "file"), cfg)
    assert res.frames == len(got) == FRAMES
    frames, _ = read_frames(clip)
    want, default = _expected(model, frames, method, **kw), _expected(model, frames, method)
    for g, w, d in zip(got, want, default):
        diff = np.abs(g.astype(int) - w)
        assert diff.max() <= 1 and diff.mean() < 0.01   # the same maps (threads may round a level apart)
        assert np.abs(g.astype(int) - d).mean() > 2      # not the default maps
    # an explainer handed in keeps its own layer and placement: asking for others is an error
    from explicam.runtime.explainer import Explainer

    if method == "finercam":  # options apply to an explainer handed in as well
        got.clear()
        explain_stream(Source(str(clip), "clip", "file"), StreamConfig(method=method, labels=False, options=OPTIONS),
                       explainer=Explainer(model, batch_size=1, warmup=False))
        assert all(np.abs(g.astype(int) - w).max() <= 1 for g, w in zip(got, _expected(model, frames, method,
                                                                                        options=OPTIONS)))
        return
    with pytest.raises(ValueError, match="given explainer's"):
        explain_stream(Source(str(clip), "clip", "file"), cfg, explainer=Explainer(model, warmup=False))


@pytest.mark.parametrize("method,kw", CASES)
def test_video_command_line_takes_the_image_options(multi, tmp_path, method, kw):
    model, clip = multi
    out = tmp_path / "o.avi"
    res = run_cli("explain", "--video", clip, "--output", out, "--model", model, "--method", method, *ARGS[method],
                  "--no-labels")
    assert res.returncode == 0, res.stderr[-2000:]
    written, _ = read_frames(out)
    frames, _ = read_frames(clip)
    assert len(written) == FRAMES
    want, default = _expected(model, frames, method, **kw), _expected(model, frames, method)
    for g, w, d in zip(written, want, default):   # MJPG is lossy: the nearer of the two by far
        near, far = np.abs(g.astype(int) - w).mean(), np.abs(g.astype(int) - d).mean()
        assert near < 4 and far > 2 * near, (near, far)


def test_video_refuses_preprocessing_and_names_a_missing_layer(multi, tmp_path):
    model, clip = multi
    bad = run_cli("explain", "--video", clip, "--model", model, "--scale", "1/255", "--out", tmp_path)
    assert bad.returncode != 0 and "preprocessing options" in bad.stderr
    bad = run_cli("explain", "--video", clip, "--model", model, "--feature-layer", "nope", "--out", tmp_path)
    assert bad.returncode != 0 and "no feature layer 'nope'" in bad.stderr
