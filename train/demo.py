"""`python cli.py demo`: the whole walk on the built-in dataset, on a fresh machine.

dataset -> train kernel 4 -> export to ONNX (checked against Keras) -> explain a handful
of validation images -> a small report. Settings are chosen to finish in minutes on 2
CPU cores (128 px images, batch 32, at most 15 epochs) while keeping the seed network and
optimiser; each step prints the command that repeats it. Every step reuses what a
previous run finished, so running the demo again is quick.
"""
from __future__ import annotations

import os
import time

DEMO_TRAIN = dict(kernel=4, batch_size=32, patience=5, seed=0)
REPORT_METHODS = ["gradcam", "gradcam++", "eigencam"]


def _one_per_class(data: str) -> list:
    from explicam.train.data import find_dataset

    ds = find_dataset(data)
    labels = ds.val.labels.tolist()
    return [ds.val.paths[labels.index(c)] for c in range(len(ds.class_names)) if c in labels]


def run_demo(data: str, image_size: int = 128, max_epochs: int = 15, log=print) -> dict:
    from explicam.evaluate import run_report
    from explicam.evaluate.sweep import ensure_export
    from explicam.runtime.files import explain_files
    from explicam.train import synth
    from explicam.train.fit import TrainConfig, result_line, train

    t0 = time.time()
    run_dir = os.path.join("runs", "k4")
    if not os.path.isdir(os.path.join(data, "training")):
        log(f"[1/5] generating the built-in dataset: python cli.py dataset synth --out {data}")
        synth.generate(data, seed=0)
    else:
        log(f"[1/5] using the dataset already in {data}")

    cfg = TrainConfig(data=data, image_size=image_size, max_epochs=max_epochs, **DEMO_TRAIN)
    log(f"[2/5] training kernel 4: python cli.py train --data {data} --kernel 4 --image-size {image_size} "
        f"--batch-size 32 --max-epochs {max_epochs} --patience 5 --seed 0")
    summary = train(cfg, run_dir=run_dir, verbose=2, log=log)
    log(result_line(summary))

    log("[3/5] exporting to ONNX: python cli.py export --kernel 4")
    onnx = ensure_export(run_dir, log=log)
    log(f"      {onnx}")

    out = os.path.join(run_dir, "explanations")
    photos = _one_per_class(data)
    log(f"[4/5] explaining {len(photos)} validation images: python cli.py explain {data}/validation/... "
        f"--model {onnx} --out {out}")
    res = explain_files(photos, model=onnx, out=out, method="gradcam")
    log(f"      overlays: {out}/ ({len(res.images)} images), predictions: {res.csv}")

    log(f"[5/5] a small report ({', '.join(REPORT_METHODS)}, 100 validation images): python cli.py evaluate "
        f"--model {onnx} --data {data} --methods {','.join(REPORT_METHODS)} --limit 100")
    report = run_report(data, [run_dir], out="report", methods=REPORT_METHODS, limit=100, log=log,
                        command="python cli.py demo")
    log(f"\ndone in {(time.time() - t0) / 60:.1f} min")
    log(result_line(summary))
    log(f"overlays: {out}/   report: {report}")
    return {"summary": summary, "onnx": onnx, "explanations": out, "report": report}
