"""Training side of explicam (needs the `train` extra: TensorFlow)."""
import os
import sys


def quiet_tensorflow():
    """Import TensorFlow with its start-up log lines (written straight to fd 2 by C++,
    before any Python setting applies) kept off the terminal; shown if the import fails."""
    if sys.modules.get("tensorflow") is not None:
        return
    import tempfile

    with tempfile.TemporaryFile() as sink:
        saved = os.dup(2)
        os.dup2(sink.fileno(), 2)
        try:
            import tensorflow as tf

            tf.config.list_physical_devices()  # the CUDA probe logs too, on machines without a GPU
        except ModuleNotFoundError:
            # an edge install: the runtime without the `train` extra
            raise RuntimeError("this command needs TensorFlow, which edge installs leave out: "
                               "pip install '.[train]' (or 'explicam[train]')") from None
        except BaseException:
            os.dup2(saved, 2)
            sink.seek(0)
            sys.stderr.write(sink.read().decode(errors="replace"))
            raise
        finally:
            os.dup2(saved, 2)
            os.close(saved)
