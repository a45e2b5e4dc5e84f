"""`cli.py bench`: one table, every row measured beside the plain forward pass."""
from tests.conftest import cli_in_process, run_cli


def test_bench_writes_a_table_with_ratios(onnx_model, tmp_path):
    out = tmp_path / "bench.md"
    res = run_cli("bench", "--model", onnx_model, "--batches", "1,2", "--seconds", 0.05,
                  "--methods", "gradcam,eigencam", "--out", out)
    assert res.returncode == 0, res.stderr[-2000:]
    rows = [line.split("|")[1:-1] for line in out.read_text().splitlines() if line.startswith("| ")][1:]
    table = {(r[0].strip(), r[1].strip(), int(r[2])): (float(r[3]), float(r[4])) for r in rows}
    for batch in (1, 2):
        assert table[("forward (onnxruntime)", "-", batch)][1] == 1.0
        for method in ("gradcam", "eigencam"):
            for kernels in ("numba", "numpy"):
                ms, ratio = table[(method, kernels, batch)]
                assert ms > 0 and ratio > 0
        # the keras.io recipe runs here because TensorFlow and model.keras are present
        assert ("keras.io Grad-CAM (TF)", "-", batch) in table
    assert "onnxruntime: ORT_ENABLE_ALL" in out.read_text() and "Machine:" in out.read_text()


def test_bench_refuses_bad_batches(onnx_model):
    res = cli_in_process("bench", "--model", onnx_model, "--batches", "one")
    assert res.returncode != 0 and "Traceback" not in res.stderr and "--batches" in res.stderr


def test_bench_times_scorecam_with_and_without_crops(onnx_model, tmp_path):
    out = tmp_path / "bench.md"
    res = run_cli("bench", "--model", onnx_model, "--batches", "1", "--seconds", 0.05, "--methods", "scorecam",
                  "--out", out)
    assert res.returncode == 0, res.stderr[-2000:]
    text = out.read_text()
    rows = {tuple(c.strip() for c in line.split("|")[1:3]): float(line.split("|")[5])
            for line in text.splitlines() if line.startswith("| scorecam")}
    assert set(rows) == {("scorecam", "numba"), ("scorecam", "numpy"), ("scorecam, whole images", "numba")}
    assert all(r > 1 for r in rows.values())  # many forward passes' worth, either way
    assert "Score-CAM: masked images run only where each mask reaches" in text
    assert "of the convolution work of whole images" in text


def test_bench_times_ablationcam_beside_its_head_reruns(onnx_model, tmp_path):
    # the seed's head is measured linear (export/headgrad.ablation_linear): the paper's re-runs get a row too
    out = tmp_path / "bench.md"
    res = run_cli("bench", "--model", onnx_model, "--batches", "1", "--seconds", 0.05, "--methods", "ablationcam",
                  "--out", out)
    assert res.returncode == 0, res.stderr[-2000:]
    rows = {tuple(c.strip() for c in line.split("|")[1:3]): float(line.split("|")[5])
            for line in out.read_text().splitlines() if line.startswith("| ablationcam")}
    assert set(rows) == {("ablationcam", "numba"), ("ablationcam", "numpy"), ("ablationcam, head re-runs", "numba")}
    assert all(r > 0 for r in rows.values())


def test_interleaved_rounds_never_run_a_row_twice_in_a_row_and_vary_its_neighbours():
    """Every round calls each row once; no row runs right after itself (it would find its
    caches warm), across the turn from one round to the next too (mirrored rounds ran the
    first and the last row twice in a row at every turn); and each row follows every other
    row in some rounds."""
    from collections import Counter

    from explicam.runtime.bench import _interleaved

    calls = []
    fns = {name: (lambda n=name: calls.append(n)) for name in "abcd"}
    ms = _interleaved(fns, 1, min_seconds=0.0, min_rounds=80, max_rounds=80)
    assert set(ms) == set("abcd") and all(v >= 0 for v in ms.values())
    warm, timed = calls[:4], calls[4:]
    assert warm == list("abcd") and len(timed) == 320
    assert all(sorted(timed[i:i + 4]) == list("abcd") for i in range(0, 320, 4))
    seq = warm + timed
    assert all(x != y for x, y in zip(seq, seq[1:]))
    before = Counter(zip(timed, timed[1:]))
    for x in "abcd":
        for y in "abcd":
            if x != y:
                assert before[(x, y)] >= 10, (x, y, before)


def test_bench_profile_counts_the_graphs_own_nodes(onnx_model, tmp_path):
    """`bench --profile`: per op type, the nodes onnxruntime ran in each file of the export; the
    forward file's Conv and MaxPool counts are the ONNX graph's own (the seed's five blocks;
    onnxruntime fuses each ReLU into its Conv), and the op types' times add up to the total."""
    import onnx

    from explicam.runtime.op_profile import profile_export

    results = {r["file"]: r for r in profile_export(str(onnx_model), batch=2, threads=1, calls=3)}
    assert {"model.onnx", "model.forward.onnx"} <= set(results)
    forward = results["model.forward.onnx"]
    graph = onnx.load(str(onnx_model.parent / "model.forward.onnx")).graph
    ops = {op: n for op, _, n in forward["ops"]}
    for op in ("Conv", "MaxPool"):
        assert ops[op] == sum(n.op_type == op for n in graph.node), (op, ops)
    assert abs(sum(ms for _, ms, _ in forward["ops"]) - forward["kernel_ms"]) < 1e-9 and forward["call_ms"] > 0
    out = tmp_path / "profile.md"
    res = run_cli("bench", "--model", onnx_model, "--profile", "--batches", "1", "--threads", "1", "--out", out)
    assert res.returncode == 0, res.stderr[-2000:]
    text = out.read_text()
    assert "model.forward.onnx, the classifier alone:" in text and "| Conv |" in text and "1 thread(s)" in text
