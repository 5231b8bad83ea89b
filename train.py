r"""Fine-tune a vision-language model with PRSL (and baselines), then compare their robustness.

  python train.py                                   # embedded default, no download
  python train.py --config configs/vitb32_cifar10.py:adv_prsl --workdir runs/x
  python train.py --config.loss.end=6 --config.total_steps=400

A workdir with a checkpoint resumes from it. Multi-host: add
--coordinator_address=auto on TPU pods (or host:port --num_processes
--process_id for explicit launches); every host runs the same command.
Everything else is the library: prsl_jax.trainer.run(config, workdir).
"""

import os
import sys

from absl import app
from absl import flags
from ml_collections import config_flags

from prsl_jax import cli


def _define_config_flag():
  """--config, with a one-line message for an override of a field the config lacks.

  config_flags applies the --config.* overrides when the flag is defined, and a
  missing field fails there with only the bare key ("'kk'"): name the argument
  and the closest field.
  """
  default = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "default.py")
  try:
    return config_flags.DEFINE_config_file(
        "config", default,
        "Training config file (ml_collections get_config); override with --config.key=value.")
  except (AttributeError, KeyError, ValueError, TypeError, flags.Error) as e:
    if "--debug" in sys.argv:
      raise
    cli.fail(cli.config_key_error(e, sys.argv))


_CONFIG = _define_config_flag()
_WORKDIR = flags.DEFINE_string("workdir", None, "Output folder (default: config.workdir).")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "Multi-host: 'auto' (TPU pods, SLURM) or host:port.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Multi-host: process count.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "Multi-host: this process's index.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  cli.quiet_logs()
  cli.setup_compilation_cache()
  from prsl_jax import sharding  # pylint: disable=g-import-not-at-top
  from prsl_jax import trainer  # pylint: disable=g-import-not-at-top
  config = _CONFIG.value
  workdir = _WORKDIR.value or config.workdir
  overrides = config_flags.get_override_values(flags.FLAGS["config"])
  # A bad config, override or workdir stops before any compute.
  trainer.preflight(config, workdir, overrides=overrides)
  sharding.maybe_initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value,
                                        _PROCESS_ID.value)
  out = trainer.run(config, workdir, checked=True)  # preflight ran above
  if out["table"]:
    print(f"\nAccuracy (%) on {config.eval.num_examples or 'all'} {config.data.name} "
          f"{config.data.eval_split} examples; L-inf budgets on [0, 1] pixels:\n")
    print(out["table"])
    print(f"wrote {workdir}/results.json, results.md, robustness.png; fine-tuned models in "
          f"{workdir}/<loss>/export")


if __name__ == "__main__":
  app.run(lambda argv: cli.run(main, argv), flags_parser=cli.parse_flags_or_exit)
