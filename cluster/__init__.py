"""explicam on a Ray cluster (the `cluster` extra: pip install 'explicam[cluster]').

    cluster/explain.py   bulk explanations: Ray Data, one Explainer per actor, Parquet results
    cluster/sweep.py     the kernel-size sweep with each run as a Ray task
    cluster/bench.py     Ray Data explanation rate against the one-machine explain
    cluster/train.py     one training run over several machines with Ray Train (train --distribute ray)

Importing these modules needs no Ray; calling them does (connect() says what to install).
Nothing on the edge path (runtime/, camkernels/) imports this package.
"""
from __future__ import annotations

import os

LOCAL = "local"


def require_ray():
    try:
        import pyarrow  # noqa: F401 - the results are Parquet
        import ray
    except ModuleNotFoundError:
        raise RuntimeError("--ray needs Ray, which the base and [train] installs leave out: "
                           "pip install '.[cluster]' (or 'explicam[cluster]')") from None
    return ray


def connect(address: str | None = None, num_cpus: int | None = None):
    """Ray, initialised once: an address (host:port, ray://host:10001 or 'auto': the cluster
    this machine belongs to, as `ray start` left it), or none / 'local': a Ray started here
    for this process (num_cpus: its CPUs [default: all])."""
    ray = require_ray()
    if ray.is_initialized():
        return ray
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    if address in (None, "", LOCAL):
        ray.init(num_cpus=num_cpus, include_dashboard=False, logging_level="warning",
                 configure_logging=True, log_to_driver=True)
    else:
        ray.init(address=address, logging_level="warning")
    return ray
