"""Runs a few fine-tuning steps of the bundled tiny CLIP; saves the final params.

Run as a subprocess by test_train.py so that device count, process count and a
SIGKILL are real:

  python tests/train_worker.py --workdir=DIR --out=OUT.npz [--kill_after_save=S]
      [--coordinator_address host:port --num_processes 2 --process_id i]
      [--config.key=value ...]
"""

import os
import signal
import sys

from absl import app
from absl import flags
import jax
import numpy as np

# A small config by default; --config.key=value overrides still work. This must
# precede `import train`: config_flags reads sys.argv when the flag is defined.
if not any(a.startswith("--config=") for a in sys.argv):
  sys.argv.insert(1, "--config=" + os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                "small_config.py"))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import train as train_lib  # pylint: disable=wrong-import-position
import prsl_jax  # pylint: disable=wrong-import-position
from prsl_jax import checkpoints  # pylint: disable=wrong-import-position
from prsl_jax import data  # pylint: disable=wrong-import-position
from prsl_jax import sharding  # pylint: disable=wrong-import-position
from prsl_jax import zeroshot  # pylint: disable=wrong-import-position

_KILL = flags.DEFINE_integer("kill_after_save", 0, "SIGKILL self right after saving this step.")
_OUT = flags.DEFINE_string("out", None, "Where to save the final params (.npz).")


def main(argv):
  del argv
  workdir, out = train_lib._WORKDIR.value, _OUT.value  # pylint: disable=protected-access
  train_lib.quiet_logs()
  sharding.maybe_initialize_distributed(train_lib._COORDINATOR.value,  # pylint: disable=protected-access
                                        train_lib._NUM_PROCESSES.value,  # pylint: disable=protected-access
                                        train_lib._PROCESS_ID.value)  # pylint: disable=protected-access
  config = train_lib._CONFIG.value  # pylint: disable=protected-access
  if _KILL.value:
    save = checkpoints.save
    def save_then_die(mgr, state, data_state):
      save(mgr, state, data_state)
      if int(jax.device_get(state["step"])) == _KILL.value:
        # No wait_until_finished: the async save may be half written, as in a real kill.
        os.kill(os.getpid(), signal.SIGKILL)
    checkpoints.save = save_then_die
  clip = prsl_jax.load_pretrained(config.model.path)
  source, names = data.load("digits", "train", image_size=clip.image_size)
  class_emb = zeroshot.class_embeddings(clip, clip.params, names)
  mesh = sharding.make_mesh()
  params = train_lib.train(config, workdir, clip, source, class_emb, None, mesh)
  if jax.process_index() == 0:
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    np.savez(out, **{jax.tree_util.keystr(k): np.asarray(v) for k, v in leaves})
  print(f"devices={jax.device_count()} processes={jax.process_count()} done")


if __name__ == "__main__":
  app.run(main)
