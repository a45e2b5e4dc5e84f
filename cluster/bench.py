"""`python cli.py bench --ray [ADDRESS] --images DIR`: bulk explanation through Ray Data
against the one-machine `explain`, on the same images, in one run (not a test).

Both write what `explain` writes (an overlay per image and predictions.csv; Ray adds its
Parquet rows). Each path is timed end to end (start-up included: the model loaded and the
kernels warmed, Ray's actors started) and in steady state (from the first results to the
last). The Ray path runs once per actor count in --ray-actors (1 CPU each), which gives
the rate one more CPU adds, for planning a cluster. The paths take turns for --rounds
rounds and the medians are reported.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import time


def _one_machine(images: list, cfg, log) -> dict:
    from explicam.runtime.files import explain_files

    first = []

    def progress(n):
        if not first:
            first.append((time.perf_counter(), n))
    t0 = time.perf_counter()
    res = explain_files(images, cfg, progress=progress)
    t1 = time.perf_counter()
    n = len(res.images)
    steady = (n - first[0][1]) / (t1 - first[0][0]) if first and t1 > first[0][0] else float("nan")
    log(f"  one machine: {n} images in {t1 - t0:.1f}s ({n / (t1 - t0):.1f}/s; {steady:.1f}/s after the first batch)")
    return {"images": n, "seconds": t1 - t0, "rate": n / (t1 - t0), "steady_rate": steady}


def _on_ray(images: list, cfg, rcfg, log) -> dict:
    from explicam.cluster.explain import explain_on_ray

    t0 = time.perf_counter()
    res = explain_on_ray(images, cfg, rcfg, log=lambda m: None)
    t1 = time.perf_counter()
    n = res.explained
    steady = (n - res.first_rows) / (t1 - res.first_rows_at) if res.first_rows_at else float("nan")
    log(f"  Ray, {res.actors} actor(s): {n} images in {t1 - t0:.1f}s ({n / (t1 - t0):.1f}/s; "
        f"{steady:.1f}/s after the first results)")
    return {"actors": res.actors, "images": n, "seconds": t1 - t0, "rate": n / (t1 - t0), "steady_rate": steady}


def bench_ray(model: str, images: list, address: str | None = None, actors=(1, 2), method: str = "gradcam",
              batch_size: int = 16, rounds: int = 3, log=print) -> dict:
    """Images/s of `explain` on one machine and through Ray Data with each actor count,
    taking turns for `rounds` rounds (medians: a shared machine's load hits all alike)."""
    import statistics

    from explicam.cluster import connect
    from explicam.cluster.explain import RayConfig
    from explicam.runtime.files import FilesConfig

    work = tempfile.mkdtemp(prefix="explicam-raybench-")
    cfg = FilesConfig(model=model, method=method, batch_size=batch_size)
    at = lambda name: FilesConfig(**{**cfg.__dict__, "out": f"{work}/{name}"})  # noqa: E731
    runs = {"one": [], **{a: [] for a in actors}}
    try:
        log(f"bench: {len(images)} images, {method}, batch {batch_size}, {rounds} round(s); outputs under {work} "
            "(removed after)")
        connect(address, max(actors) if address in (None, "local") else None)  # Ray's own start-up is not timed
        for r in range(rounds):
            log(f" round {r + 1}")
            runs["one"].append(_one_machine(images, at(f"one{r}"), log))
            for a in actors:
                runs[a].append(_on_ray(images, at(f"ray{a}-{r}"), RayConfig(address, concurrency=a), log))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    med = lambda rows, key: statistics.median(x[key] for x in rows)  # noqa: E731
    out = {"images": len(images), "rounds": rounds,
           "one_machine": {k: med(runs["one"], k) for k in ("rate", "steady_rate")},
           "ray": [{"actors": a, **{k: med(runs[a], k) for k in ("rate", "steady_rate")}} for a in actors]}
    one, best = out["one_machine"], out["ray"][-1]
    out["ratio"] = best["rate"] / one["rate"]
    out["steady_ratio"] = best["steady_rate"] / one["steady_rate"]
    if len(out["ray"]) > 1:
        lo, hi = out["ray"][0], out["ray"][-1]
        out["per_added_cpu"] = (hi["rate"] - lo["rate"]) / max(1, hi["actors"] - lo["actors"])
    out["per_actor"] = out["ray"][0]["rate"] / out["ray"][0]["actors"]
    return out


def summary_lines(res: dict) -> list:
    one = res["one_machine"]
    lines = [f"median of {res['rounds']} round(s), {res['images']} images each:",
             f"one machine ({os.cpu_count()} cores): {one['rate']:.1f} images/s ({one['steady_rate']:.1f} steady)"]
    for r in res["ray"]:
        lines.append(f"Ray Data, {r['actors']} actor(s): {r['rate']:.1f} images/s ({r['steady_rate']:.1f} steady)")
    lines.append(f"Ray ({res['ray'][-1]['actors']} actors) / one machine: {res['ratio']:.2f} end to end "
                 f"({res['steady_ratio']:.2f} after the first results; Ray's is an upper bound: work in flight "
                 "then counts)")
    if "per_added_cpu" in res:
        lines.append(f"each added CPU (actor): {res['per_added_cpu']:+.1f} images/s end to end")
    lines.append(f"one actor of 1 CPU: {res['per_actor']:.1f} images/s end to end")
    return lines
