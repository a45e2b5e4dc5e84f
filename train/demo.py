"""`python cli.py demo`: the whole walk on the built-in dataset, on a fresh machine.

Settings are chosen to finish in minutes on 2 CPU cores (128 px images, batch 32, at
most 15 epochs) while keeping the seed network and optimiser; they are printed so the
run can be repeated with `cli.py train`.
"""
from __future__ import annotations

import os

DEMO_TRAIN = dict(kernel=4, batch_size=32, patience=5, seed=0)


def run_demo(data: str, image_size: int = 128, max_epochs: int = 15, log=print) -> dict:
    from train import synth
    from train.fit import TrainConfig, result_line, train

    if not os.path.isdir(os.path.join(data, "training")):
        log(f"[1/2] generating the built-in dataset in {data}")
        synth.generate(data, seed=0)
    else:
        log(f"[1/2] using the dataset already in {data}")
    cfg = TrainConfig(data=data, image_size=image_size, max_epochs=max_epochs, **DEMO_TRAIN)
    run_dir = os.path.join("runs", "k4")
    log(f"[2/2] training kernel 4 into {run_dir}: python cli.py train --data {data} --kernel 4 "
        f"--image-size {image_size} --batch-size 32 --max-epochs {max_epochs} --patience 5 --seed 0")
    summary = train(cfg, run_dir=run_dir, verbose=2, log=log)
    log(result_line(summary))
    return summary
