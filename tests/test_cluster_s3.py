"""`explain SRC.csv --ray` on s3:// URIs (issue #13), against moto's S3 server on 127.0.0.1 (no
network) and the session's local Ray, which was started without any AWS_* variable, like a
cluster node: the driver's settings reach the actors (cluster/sources.reader_env).

  - URIs that carry the endpoint in their query (?endpoint_override=HOST:PORT&scheme=http),
    listed in a local CSV: each image's top-k and heatmap equal the one-machine explanation of
    the same local file, a corrupt and a missing object are rows with an error naming the URI,
    output names carry no query string;
  - plain URIs with the endpoint in AWS_ENDPOINT_URL, the CSV itself on S3, through the CLI."""
import logging
import os
import shutil
from dataclasses import replace

import numpy as np
import pytest

from tests.conftest import run_cli
from tests.ray_cluster import ray_address  # noqa: F401 - the session fixture

pytest.importorskip("ray", reason="the Ray tests need the cluster extra: pip install '.[cluster]'")
moto_server = pytest.importorskip("moto.server", reason="the S3 tests need moto's S3 server: "
                                  "pip install 'moto[server]' (make test installs it)")

BUCKET = "photos"
N = 12


@pytest.fixture
def s3(monkeypatch):
    """(boto3 client, 'HOST:PORT') of a fresh moto S3 server with one bucket; fake credentials."""
    for name in [k for k in os.environ if k.startswith("AWS_")]:
        monkeypatch.delenv(name)  # nothing of this machine's own AWS settings
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one log line per request otherwise
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        import boto3

        client = boto3.client("s3", endpoint_url=f"http://{host}:{port}")
        client.create_bucket(Bucket=BUCKET)
        yield client, f"{host}:{port}"
    finally:
        server.stop()


def _upload(client, synth_dir, local, n):
    """n generated images, copied to `local` and uploaded as in/NN.jpg; their keys."""
    local.mkdir(parents=True, exist_ok=True)
    keys = []
    for i, p in enumerate(sorted((synth_dir / "training").rglob("*.jpg"))[:n]):
        shutil.copy(p, local / f"{i:02d}.jpg")
        client.upload_file(str(p), BUCKET, f"in/{i:02d}.jpg")
        keys.append(f"in/{i:02d}.jpg")
    return keys


def _reference(onnx_model, local, keys, k):
    """The one-machine Explainer on the local copies: {stem: (top-k, min-max normalised map)}."""
    from explicam.runtime.explainer import Explainer
    from explicam.runtime.images import read_image

    ex = Explainer(str(onnx_model), warmup=False)
    stems = [os.path.splitext(os.path.basename(key))[0] for key in keys]
    res = ex.explain([read_image(str(local / f"{s}.jpg")) for s in stems], "gradcam")
    cams = ex.k.normalize_minmax(res.cams)
    return {s: (res.top_k(k)[i], cams[i]) for i, s in enumerate(stems)}


def _assert_same(rows, ref):
    """Parquet rows (no errors) against _reference: classes, probabilities, feature-size map."""
    assert sorted(rows["stem"]) == sorted(ref)
    for _, r in rows.iterrows():
        top, cam = ref[r["stem"]]
        assert list(r["classes"]) == [c for c, _ in top], r["path"]
        np.testing.assert_allclose(r["probabilities"], [p for _, p in top], atol=1e-6, err_msg=r["path"])
        heat = np.asarray(r["heatmap"], np.float32).reshape(int(r["heatmap_h"]), int(r["heatmap_w"]))
        assert heat.shape == cam.shape
        np.testing.assert_allclose(heat, cam, atol=1e-6, err_msg=r["path"])


def test_s3_uris_in_a_csv_explain_as_the_local_files(ray_address, onnx_model, synth_dir, s3,  # noqa: F811
                                                     tmp_path):
    import pandas as pd

    from explicam.cluster.explain import RayConfig, bad_rows, explain_on_ray
    from explicam.runtime.files import FilesConfig, explain_files

    client, endpoint = s3
    keys = _upload(client, synth_dir, tmp_path / "local", N)
    client.put_object(Bucket=BUCKET, Key="in/broken.jpg", Body=b"not an image")
    query = f"?endpoint_override={endpoint}&scheme=http"
    uris = [f"s3://{BUCKET}/{key}{query}" for key in keys]
    broken, gone = f"s3://{BUCKET}/in/broken.jpg{query}", f"s3://{BUCKET}/in/gone.jpg{query}"
    pd.DataFrame({"path": uris + [broken, gone]}).to_csv(tmp_path / "list.csv", index=False)

    cfg = FilesConfig(model=str(onnx_model), heatmap="npy", batch_size=4)
    one = explain_files([tmp_path / "local"], cfg, out=str(tmp_path / "one"))
    # the keys stay on the driver unless asked for: the session Ray's workers have none, so every read is refused
    denied = explain_on_ray([tmp_path / "list.csv"], replace(cfg, out=str(tmp_path / "denied")),
                            RayConfig(ray_address, concurrency=2))
    assert (denied.explained, denied.errors) == (0, N + 2)
    res = explain_on_ray([tmp_path / "list.csv"], replace(cfg, out=str(tmp_path / "ray")),
                         RayConfig(ray_address, concurrency=2, credentials=True))
    assert len(one.images) == N and (res.explained, res.errors, res.total) == (N, 2, N + 2)

    rows = pd.read_parquet(res.results)
    assert sorted(rows["path"]) == sorted(uris + [broken, gone])
    good = rows[rows["error"].isna()]
    _assert_same(good, _reference(onnx_model, tmp_path / "local", keys, 3))
    # the same output names as the one-machine path: the key's name, never the query string
    assert sorted(good["output"]) == sorted(os.path.basename(p) for p in one.written)
    written = sorted(p.name for p in (tmp_path / "ray").iterdir() if p.suffix in (".png", ".npy"))
    assert written == sorted(p.name for p in (tmp_path / "one").iterdir() if p.suffix in (".png", ".npy"))
    for name in written:
        if name.endswith(".npy"):
            np.testing.assert_allclose(np.load(tmp_path / "ray" / name), np.load(tmp_path / "one" / name),
                                       atol=1e-6, err_msg=name)
    errors = bad_rows(res.results)
    assert len(errors) == 2
    assert any(e.startswith(broken) for e in errors), errors  # decoded, not an image
    assert any(e.startswith(gone) and "does not exist" in e for e in errors), errors


def test_endpoint_from_the_environment_and_the_csv_on_s3(ray_address, onnx_model, synth_dir, s3,  # noqa: F811
                                                         tmp_path):
    """As a user types it on a cluster's head: plain URIs, the endpoint and credentials in the
    usual AWS variables of the driver (the session Ray's workers have none of them)."""
    import pandas as pd

    client, endpoint = s3
    keys = _upload(client, synth_dir, tmp_path / "local", 3)
    listing = "path\n" + "".join(f"s3://{BUCKET}/{key}\n" for key in keys)
    client.put_object(Bucket=BUCKET, Key="lists/three.csv", Body=listing.encode())
    out = tmp_path / "out"
    proc = run_cli("explain", f"s3://{BUCKET}/lists/three.csv", "--model", onnx_model, "--out", out,
                   "--ray", ray_address, "--concurrency", "1", "--ray-credentials", timeout=180,
                   env={"AWS_ENDPOINT_URL": f"http://{endpoint}"})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "explained 3 image(s)" in proc.stdout, proc.stdout
    rows = pd.read_parquet(out / "results")
    assert rows["error"].isna().all() and sorted(rows["path"]) == [f"s3://{BUCKET}/{key}" for key in keys]
    _assert_same(rows, _reference(onnx_model, tmp_path / "local", keys, 3))
    assert sorted(p.name for p in out.glob("*.png")) == ["00_gradcam.png", "01_gradcam.png", "02_gradcam.png"]
