"""Runs a few fine-tuning steps of the bundled tiny CLIP; saves the final params.

Run as a subprocess by test_train.py so that device count, process count and a
SIGKILL are real (from the repository root, so that configs/ imports):

  python -m tests.train_worker --workdir=DIR --out=OUT.npz [--kill_after_save=S]
      [--step_delay=SECONDS]
      [--coordinator_address host:port --num_processes 2 --process_id i]
      [--config.key=value ...]
"""

import os
import signal
import time

from absl import app
from absl import flags
import jax
import numpy as np
from ml_collections import config_flags

from prsl_jax import checkpoints
from prsl_jax import cli
from prsl_jax import compilation
from prsl_jax import sharding
from prsl_jax import trainer

_CONFIG = config_flags.DEFINE_config_file(
    "config", os.path.join(os.path.dirname(os.path.abspath(__file__)), "small_config.py"),
    "Training config (default: the trainer tests' small config).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Run folder.")
_OUT = flags.DEFINE_string("out", None, "Where to save the final params (.npz).")
_KILL = flags.DEFINE_integer("kill_after_save", 0, "SIGKILL self right after saving this step.")
_DELAY = flags.DEFINE_float("step_delay", 0, "Sleep this long after each step (so that a "
                            "test's SIGTERM lands mid-training).")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "process count")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "this process's index")


def main(argv):
  del argv
  sharding.maybe_initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value,
                                        _PROCESS_ID.value)
  if os.environ.get("PRSL_JAX_CACHE"):  # the test session's cache (tests/conftest.py)
    compilation.enable_cache()
  config = _CONFIG.value
  if _KILL.value:
    save = checkpoints.save
    def save_then_die(mgr, state, data_state):
      save(mgr, state, data_state)
      if int(jax.device_get(state["step"])) == _KILL.value:
        # No wait_until_finished: the async save may be half written, as in a real kill.
        os.kill(os.getpid(), signal.SIGKILL)
    checkpoints.save = save_then_die
  if _DELAY.value:
    build = trainer.optimizer_and_step
    def slow_steps(*args, **kwargs):
      tx, step_fn = build(*args, **kwargs)
      def slow_step(*a):
        out = step_fn(*a)
        time.sleep(_DELAY.value)
        return out
      return tx, slow_step
    trainer.optimizer_and_step = slow_steps
  setup = trainer.setup(config)
  params, _ = trainer.train(config, _WORKDIR.value, setup)
  if jax.process_index() == 0:
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    np.savez(_OUT.value, **{jax.tree_util.keystr(k): np.asarray(v) for k, v in leaves})
  print(f"devices={jax.device_count()} processes={jax.process_count()} done")


if __name__ == "__main__":
  app.run(lambda argv: cli.run(main, argv))  # the CLIs' handling of errors and signals
