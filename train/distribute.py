"""`train --distribute mirrored`: tf.distribute.MirroredStrategy over this machine's devices.

Every GPU when there are any, else every logical CPU device (tests make two with
tf.config.set_logical_device_configuration). --batch-size stays the global batch: each
of R replicas computes batch/R images per step and the gradients are summed, so a run
learns what the one-device run learns, and the run folder rules (best model, resume,
lock) are train.fit's, unchanged. Only the model's variables live under the strategy;
the data pipeline is the same tf.data one (Keras splits each batch across replicas).
"""
from __future__ import annotations

import contextlib

DISTRIBUTE = ("none", "mirrored")


def make_strategy(kind: str | None):
    """None for one device; a MirroredStrategy for 'mirrored'."""
    if kind in (None, "", "none"):
        return None
    if kind != "mirrored":
        raise ValueError(f"--distribute must be one of {', '.join(DISTRIBUTE)}, got {kind!r}")
    import tensorflow as tf

    gpus = [d.name for d in tf.config.list_logical_devices("GPU")]
    if gpus:
        return tf.distribute.MirroredStrategy(devices=gpus)
    cpus = [d.name for d in tf.config.list_logical_devices("CPU")]
    # NCCL is for GPUs; on CPUs the gradients are summed on one device
    return tf.distribute.MirroredStrategy(devices=cpus, cross_device_ops=tf.distribute.ReductionToOneDevice())


def distribution_scope(kind: str | None, log=print):
    """The scope a model must be built (or loaded) and compiled in."""
    strategy = make_strategy(kind)
    if strategy is None:
        return contextlib.nullcontext()
    log(f"distribute: MirroredStrategy over {strategy.num_replicas_in_sync} device(s) "
        f"({', '.join(strategy.extended.worker_devices)})")
    return strategy.scope()
