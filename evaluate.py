r"""Evaluate checkpoints under attack: zero-shot clean and robust accuracy.

  python evaluate.py --checkpoint prsl_jax/assets/tiny_clip --dataset digits \
      --eps 1/255,2/255,4/255 --suite standard --num_examples 500 --seed 0 \
      --outdir runs/eval_digits
  python evaluate.py --checkpoint runs/default/prsl,runs/default/ce --suite paper \
      --suite pgd-ce --suite standard --outdir runs/eval_paper
  python evaluate.py --config my_eval.py --config.eps=4/255 --outdir runs/x

Checkpoints (comma-separated, all in one table and one plot): a train.py run
folder (config.json + checkpoints/: the newest checkpoint's params on the model
its config.json names), a folder written by save_pretrained or transformers
(config.json + model.safetensors), or a HuggingFace hub id (needs network or
the hub cache). Datasets: 'digits' (embedded) or a TFDS dataset prepared as
ArrayRecord (python -c "from prsl_jax import data; data.prepare('cifar10')").

Suites (--suite, repeatable; each is its own cascade, reported side by side):
standard (AutoAttack: APGD-CE, APGD-T, FAB-T, Square), fast (APGD-CE, APGD-T),
pgd (PGD-CE, PGD-CW), paper (the paper's BIM-10 through the model's own training
loss, read from the run's config or the export), or comma-separated attacks.
Captioners (ViT + GPT-2; the kind is read from the checkpoint) are attacked on
the token loss of their own clean caption: suites paper, strong (APGD-CE) and
pgd; the record has caption change rates, keyword survival, BLEU-4/CIDEr and
the diversity of generation; --target_caption adds a targeted attack.

Several datasets in one run (classifiers): --dataset cifar10,cifar100,stl10 or
--benchmark fare|tecoa (prsl_jax.benchmarks), each dataset with its own class
names, templates, split and subset size, and --protocol tecoa|fare|standard for
the field's settings. One results.json keyed by dataset, rewritten after every
dataset; rerunning the same command skips the datasets done and finishes the
rest (other settings are refused). results.md has a table per model, a column
per dataset and the average; robustness.png robust accuracy per dataset.

Writes into --outdir: results.json (all numbers, per-example outcomes, the exact
command, package versions, seed and the evaluated subset), results.md (the
table) and robustness.png. results.json is rewritten after every model, so a
failure keeps the finished ones. Refuses an outdir that already has
results.json unless --overwrite (or, several datasets, the same command that
finishes it). Everything else is prsl_jax.evaluator.run.

Flags also take dashes (--num-examples, --data-dir, ...). A --config file is a
Python file whose get_config() returns an ml_collections.ConfigDict with any of
the flag names as fields; flags given on the command line win over the file.
"""

import re
import sys

from absl import app
from absl import flags
from ml_collections import config_flags

from prsl_jax import cli
from prsl_jax import eval_settings

_D = eval_settings.DEFAULTS  # the defaults' one table, shared with prsl_jax.evaluator

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Optional ml_collections config file with the fields below.",
    lock_config=False)
flags.DEFINE_list("checkpoint", _D["checkpoint"], "Checkpoint(s): train.py run folder, HF folder or "
                  "hub id; comma-separated.")
flags.DEFINE_string("dataset", _D["dataset"], "'digits' (embedded), a prepared TFDS name, or "
                    "comma-separated names of prsl_jax.benchmarks.DATASETS (one run, one "
                    "table).")
flags.DEFINE_string("benchmark", _D["benchmark"], "A named list of datasets instead of "
                    "--dataset: fare or tecoa (prsl_jax.benchmarks.BENCHMARKS).")
flags.DEFINE_string("protocol", _D["protocol"], "tecoa, fare or standard "
                    "(prsl_jax.benchmarks.PROTOCOLS): sets eps, suites, steps, targets, "
                    "queries and templates; a flag given as well wins (and is recorded).")
flags.DEFINE_string("split", _D["split"], "Dataset split to draw the evaluation subset from "
                    "(default: the benchmark dataset's, else test).")
flags.DEFINE_string("data_dir", _D["data_dir"], "TFDS data directory (default: TFDS's own).")
flags.DEFINE_string("eps", _D["eps"],
                    "Budgets on [0, 1] pixels, comma-separated; fractions allowed "
                    "(default: the protocol's, else 1/255,2/255,4/255).")
flags.DEFINE_multi_string("suite", _D["suite"], "A suite (classifiers: standard, fast, pgd, "
                          "paper; captioners: paper, strong, pgd) or comma-separated "
                          "attacks; repeat for several cascades. Default: standard for "
                          "classifiers, paper and strong for captioners.")
flags.DEFINE_enum("norm", _D["norm"], ["linf", "l2"], "Threat model.")
flags.DEFINE_integer("num_examples", _D["num_examples"], "Size of the seeded subset of the split "
                     "(0: the whole split; default: the benchmark dataset's, FARE's 1,000 "
                     "or 5,000 for ImageNet, else 1000).")
flags.DEFINE_integer("seed", _D["seed"], "Seed of the subset and of the attacks.")
flags.DEFINE_string("outdir", _D["outdir"], "Output folder.")
flags.DEFINE_enum("templates", _D["templates"], ["default", "imagenet", "benchmark", "tecoa"],
                  "Prompts: 'default' (\"This is a photo of a {}\"), CLIP's 80 "
                  "ImageNet templates, 'benchmark' (each dataset's CLIP_benchmark "
                  "templates) or 'tecoa' (TeCoA's one per dataset). Default: the "
                  "protocol's; else default for one dataset, benchmark for several.")
flags.DEFINE_integer("batch_size", _D["batch_size"], "Examples per attack call (global, over all "
                     "devices; must divide by the device count).")
flags.DEFINE_integer("steps", _D["steps"], "Iterations of APGD, APGD-T and FAB-T (per target), "
                     "PGD and BIM (default: 100; BIM 10).")
flags.DEFINE_integer("square_queries", _D["square_queries"], "Square attack queries (default 5000).")
flags.DEFINE_integer("num_targets", _D["num_targets"], "Targets of APGD-T and FAB-T (default 9).")
flags.DEFINE_integer("max_length", _D["max_length"], "Captioners: generation length in tokens "
                     "(default: the model's).")
flags.DEFINE_string("target_caption", _D["target_caption"], "Captioners: also attack toward this caption "
                    "(targeted), e.g. 'a handwritten seven'.")
flags.DEFINE_string("prompt", _D["prompt"], "Captioners that take a prompt (BLIP-2): a question "
                    "asked of every image, e.g. 'Question: what digit is this? Answer:'; "
                    "the answers are scored as VQA (accuracy against the references, answer "
                    "change rate). A VQA dataset's own questions need no flag.")
flags.DEFINE_bool("allow_pickle", _D["allow_pickle"], "Accept pytorch_model.bin checkpoints (a pickle "
                  "can run code).")
flags.DEFINE_string("vision_weights", _D["vision_weights"], "A vision tower file (.safetensors, or a "
                    ".pt/.bin pickle with --allow_pickle; open_clip, OpenAI or HF names) "
                    "that replaces the vision tower of each --checkpoint's CLIP.")
flags.DEFINE_bool("overwrite", _D["overwrite"], "Replace the results of an earlier run in --outdir.")
flags.DEFINE_string("coordinator_address", None, "Multi-host: 'auto' (TPU pods, SLURM) or "
                    "host:port; every host runs the same command, process 0 writes.")
flags.DEFINE_integer("num_processes", None, "Multi-host: process count.")
flags.DEFINE_integer("process_id", None, "Multi-host: this process's index.")
flags.DEFINE_integer("cpu_devices", None, "On the CPU: split each attack batch over this "
                     "many host devices, one per core (default: as many cores as divide "
                     "--batch_size; 1: one device). No effect on GPUs and TPUs.")

FLAGS = flags.FLAGS
FIELDS = ("checkpoint", "dataset", "benchmark", "protocol", "split", "data_dir", "eps", "suite", "norm",
          "num_examples", "seed", "outdir", "templates", "batch_size", "steps",
          "square_queries", "num_targets", "allow_pickle", "overwrite", "max_length",
          "target_caption", "prompt", "vision_weights")
_DASHABLE = FIELDS + ("coordinator_address", "num_processes", "process_id", "cpu_devices",
                      "distributed_timeout", "compilation_cache", "compilation_cache_dir")


def undash(argv):
  """--num-examples=5 -> --num_examples=5, --no-overwrite -> --nooverwrite (absl's)."""
  out = []
  for arg in argv:
    m = re.fullmatch(r"--(no-?)?([a-z][a-z0-9-]*)(=.*)?", arg, flags=re.S)
    if (m and (m.group(1) == "no-" or "-" in m.group(2))
        and m.group(2).replace("-", "_") in _DASHABLE):
      arg = f"--{'no' if m.group(1) else ''}{m.group(2).replace('-', '_')}{m.group(3) or ''}"
    out.append(arg)
  return out


def parse_flags(argv):
  """absl's parse of the undashed argv; a bad flag is one line and exit 2."""
  return cli.parse_flags_or_exit(undash(argv))


def settings():
  """Flag values, with --config fields where the flag was not on the command line."""
  config = _CONFIG.value
  out = {}
  for name in FIELDS:
    value = FLAGS[name].value
    if not FLAGS[name].present and config is not None and name in config:
      value = config[name]
    out[name] = value
  if config is not None:
    unknown = sorted(set(config) - set(FIELDS))
    if unknown:
      raise ValueError(f"--config has unknown field(s) {unknown}; fields are {list(FIELDS)}")
  return out


def cpu_devices(batch_size):
  """--cpu_devices, or the automatic count for this batch size (bad sizes: 1;
  the preflight names them)."""
  from prsl_jax import compilation  # pylint: disable=g-import-not-at-top
  if FLAGS.cpu_devices is not None:
    if FLAGS.cpu_devices < 1:
      raise ValueError(f"--cpu_devices={FLAGS.cpu_devices} must be >= 1")
    return FLAGS.cpu_devices
  if isinstance(batch_size, int) and not isinstance(batch_size, bool):
    return compilation.auto_cpu_devices(batch_size)
  return 1


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  cli.quiet_logs()
  s = settings()
  cli.setup_compilation_cache(cpu_devices=cpu_devices(s["batch_size"]))
  from prsl_jax import evaluator  # pylint: disable=g-import-not-at-top
  # Before anything touches a JAX backend (the preflight's device count does).
  cli.start_distributed(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
  checked = evaluator.preflight(s)  # everything that can be checked without compute, first
  with cli.lock_output(s["outdir"], "--outdir"):  # one run per folder
    evaluator.run(s, argv=sys.argv, checked=checked)


if __name__ == "__main__":
  app.run(lambda argv: cli.run(main, argv), flags_parser=parse_flags)
