"""The sweep's grid: kernels x seeds x image sizes (x datasets), one run folder each.

With one seed, one size and one dataset a run folder is RUNS_DIR/k{K} (k{K}_gap for the
gap head), as it always was, so existing runs are reused. Otherwise every run folder
names its point in full, RUNS_DIR/k{K}_s{SEED}_{SIZE}, and with several datasets sits
in a folder per dataset, RUNS_DIR/<dataset folder name>/k{K}_s{SEED}_{SIZE}; adding
seeds or sizes later reuses every folder that is already finished.

Seeds: `--seeds N` trains seeds S, S+1, ..., S+N-1 where S is --seed (0 when not given:
a study's runs are repeatable). One seed, one size and one dataset keep --seed as given
(None: unseeded), as before.

Nothing here imports TensorFlow: the CLI locks these folders before TensorFlow loads.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field


@dataclass(frozen=True)
class SweepGrid:
    """What `sweep` runs besides the kernels: seeds per kernel, image sizes, datasets."""
    seeds: int = 1
    image_sizes: tuple = ()     # empty: the single --image-size
    datas: tuple = ()           # empty: the single --data
    base_seed: int | None = None

    def __post_init__(self):
        if not isinstance(self.seeds, int) or self.seeds < 1:
            raise ValueError(f"--seeds must be at least 1, got {self.seeds!r}")

    @property
    def full_names(self) -> bool:
        return self.seeds > 1 or len(self.image_sizes) > 1 or len(self.datas) > 1


@dataclass(frozen=True)
class RunPoint:
    kernel: int
    seed: int | None
    size: int
    data: str
    run_dir: str
    overrides: dict = field(default_factory=dict, hash=False, compare=False)


def parse_sizes(text) -> tuple:
    if text in (None, ""):
        return ()
    try:
        sizes = tuple(int(s) for s in str(text).replace(" ", "").split(",") if s)
    except ValueError:
        raise ValueError(f"--image-sizes must be integers separated by commas, e.g. 64,128,224; got {text!r}") from None
    bad = [s for s in sizes if s < 32 or s % 32]
    if not sizes or bad or len(set(sizes)) != len(sizes):
        raise ValueError(f"--image-sizes must list distinct multiples of 32 (five 2x2 poolings), got {text!r}")
    return sizes


def parse_datas(text: str) -> tuple:
    """--data A or --data A,B,C (one sweep over several datasets, e.g. habitat-bias levels)."""
    parts = tuple(p for p in str(text).split(",") if p.strip())
    if not parts:
        raise ValueError("--data needs a dataset folder")
    names = [os.path.basename(os.path.normpath(p)) for p in parts]
    if len(set(names)) != len(names):
        raise ValueError(f"--data: several folders share a name ({', '.join(names)}); their runs would collide")
    return parts


def seeds_for(grid: SweepGrid) -> list:
    if not grid.full_names:
        return [grid.base_seed]
    base = grid.base_seed or 0
    return [base + i for i in range(grid.seeds)]


def run_name(kernel: int, head: str, seed, size: int, full: bool) -> str:
    """k4 (one seed, one size) or k4_s1_128 (k4_gap_s1_128 for the gap head)."""
    stem = f"k{kernel}" if head == "flatten" else f"k{kernel}_{head}"
    if not full:
        return stem
    return f"{stem}_s{seed}_{size}"


def plan_points(runs_dir: str, kernels, grid: SweepGrid, head: str, image_size: int, data: str) -> list:
    """Every run of the sweep, kernel-major: [RunPoint], each with its own folder."""
    sizes = grid.image_sizes or (image_size,)
    datas = grid.datas or (data,)
    points = []
    for d in datas:
        root = os.path.join(runs_dir, os.path.basename(os.path.normpath(d))) if len(datas) > 1 else runs_dir
        for size in sizes:
            for kernel in kernels:
                for seed in seeds_for(grid):
                    name = run_name(kernel, head, seed, size, grid.full_names)
                    points.append(RunPoint(kernel, seed, size, d, os.path.join(root, name),
                                           {"image_size": size, "seed": seed, "data": d}))
    return points


def grid_plan(runs_dir: str, kernels, grid: SweepGrid, make_config) -> list:
    """The sweep's plan [(kernel, run_dir, TrainConfig)] over the grid.
    make_config(kernel, **overrides) -> TrainConfig; overrides: image_size, seed, data."""
    probe = make_config(kernels[0])
    points = plan_points(runs_dir, kernels, grid, probe.head, probe.image_size, probe.data)
    return [(p.kernel, p.run_dir, make_config(p.kernel, **p.overrides)) for p in points]
