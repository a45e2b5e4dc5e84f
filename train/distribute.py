"""`train --distribute mirrored`: tf.distribute.MirroredStrategy over this machine's devices;
`--distribute ray`: MultiWorkerMirroredStrategy in each Ray Train worker (cluster/train.py).

Every GPU when there are any, else every logical CPU device (tests make two with
tf.config.set_logical_device_configuration). --batch-size stays the global batch: each
of R replicas computes batch/R images per step and the gradients are summed, so a run
learns what the one-device run learns, and the run folder rules (best model, resume,
lock) are train.fit's, unchanged. Only the model's variables live under the strategy;
the data pipeline is the same tf.data one (Keras splits each batch across replicas).

Under Ray Train every worker process is one task of a TF_CONFIG cluster: the strategy must
exist before TensorFlow runs any op, so the worker makes it first (make_strategy("ray")) and
train.fit's scope then finds that same one.
"""
from __future__ import annotations

import contextlib
import os

DISTRIBUTE = ("none", "mirrored", "ray")
_multi_worker = None  # this process's MultiWorkerMirroredStrategy: there can be one only


def make_strategy(kind: str | None):
    """None for one device; a MirroredStrategy for 'mirrored'; this worker's
    MultiWorkerMirroredStrategy for 'ray' (inside a Ray Train worker only)."""
    if kind in (None, "", "none"):
        return None
    if kind not in DISTRIBUTE:
        raise ValueError(f"--distribute must be one of {', '.join(DISTRIBUTE)}, got {kind!r}")
    import tensorflow as tf

    if kind == "ray":
        return _multi_worker_strategy(tf)

    gpus = [d.name for d in tf.config.list_logical_devices("GPU")]
    if gpus:
        return tf.distribute.MirroredStrategy(devices=gpus)
    cpus = [d.name for d in tf.config.list_logical_devices("CPU")]
    # NCCL is for GPUs; on CPUs the gradients are summed on one device
    return tf.distribute.MirroredStrategy(devices=cpus, cross_device_ops=tf.distribute.ReductionToOneDevice())


def _multi_worker_strategy(tf):
    global _multi_worker
    if _multi_worker is None:
        if not os.environ.get("TF_CONFIG"):
            raise ValueError("--distribute ray trains in Ray Train workers (cluster/train.py), which set TF_CONFIG; "
                             "run it through `cli.py train --distribute ray`")
        # CPU collectives by ring over gRPC; NCCL when the workers have GPUs (AUTO picks)
        _multi_worker = tf.distribute.MultiWorkerMirroredStrategy()
        _patch_keras_for_multi_worker()
    return _multi_worker


def distribution_scope(kind: str | None, log=print):
    """The scope a model must be built (or loaded) and compiled in."""
    strategy = make_strategy(kind)
    if strategy is None:
        return contextlib.nullcontext()
    if kind == "ray":
        log(f"distribute: MultiWorkerMirroredStrategy, {strategy.num_replicas_in_sync} replica(s) in "
            f"{strategy.cluster_resolver.cluster_spec().num_tasks('worker')} worker(s)")
        return strategy.scope()
    log(f"distribute: MirroredStrategy over {strategy.num_replicas_in_sync} device(s) "
        f"({', '.join(strategy.extended.worker_devices)})")
    return strategy.scope()


def _patch_keras_for_multi_worker():
    """Keras 3 (3.15 here) cannot fit under a multi-worker strategy as it is
    (keras-team/keras#20585), in two places, mended here for this process only (a Ray Train
    worker, which has just made its strategy; elsewhere the originals run unchanged):
    - before the first step it all-reduces one whole data batch, an (images, labels) tuple,
      which the collective reduce refuses ("Attempt to convert a value (PerReplica...)");
      that batch is only there for its shapes, so each worker builds from its own share;
    - each step's metrics, scalars, are reduced along axis 0 ("Invalid reduction dimension
      0 for input with 0 dimensions"): they are averaged over the replicas instead.
    The epoch's logs (what RunKeeper sees) come from the metrics' variables, summed over
    every worker, so they are the whole epoch's figures either way."""
    from keras.src.backend.tensorflow import trainer as tf_trainer

    needed = ("reduce_per_replica", "_collective_all_reduce_multi_worker")
    if getattr(tf_trainer, "_explicam_multi_worker", False) or not all(hasattr(tf_trainer, n) for n in needed):
        return  # mended already, or a Keras whose trainer is laid out otherwise (fixed there, one hopes)
    import tensorflow as tf

    original_build, original_reduce = tf_trainer.TensorFlowTrainer._maybe_symbolic_build, tf_trainer.reduce_per_replica
    multi_worker = tf_trainer._collective_all_reduce_multi_worker

    def _maybe_symbolic_build(self, iterator=None, data_batch=None):
        strategy = self._distribute_strategy
        if strategy is None or not multi_worker(strategy):
            return original_build(self, iterator=iterator, data_batch=data_batch)
        if iterator is not None:
            for _, _, it in iterator:
                data_batch = next(it)
                break
        local = tf.nest.map_structure(lambda v: strategy.experimental_local_results(v)[0]
                                      if isinstance(v, tf.distribute.DistributedValues) else v, data_batch)
        with strategy.scope():
            self._symbolic_build(data_batch=local)

    def reduce_per_replica(values, strategy, reduction="auto"):
        if reduction in ("auto", "mean") and multi_worker(strategy):
            return tf.nest.map_structure(lambda v: strategy.reduce("MEAN", v, axis=None), values)
        return original_reduce(values, strategy, reduction=reduction)

    tf_trainer.TensorFlowTrainer._maybe_symbolic_build = _maybe_symbolic_build
    tf_trainer.reduce_per_replica = reduce_per_replica
    tf_trainer._explicam_multi_worker = True
