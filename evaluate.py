r"""Evaluate CLIP checkpoints under attack: zero-shot clean and robust accuracy.

  python evaluate.py --checkpoint prsl_jax/assets/tiny_clip --dataset digits \
      --eps 1/255,2/255,4/255 --suite standard --num_examples 500 --seed 0 \
      --outdir runs/eval_digits
  python evaluate.py --checkpoint runs/default/prsl,openai/clip-vit-base-patch32 \
      --dataset cifar10 --data_dir ~/tensorflow_datasets --eps 1/255 --suite pgd \
      --steps 10 --outdir runs/eval_cifar10
  python evaluate.py --config my_eval.py --config.eps=4/255 --outdir runs/x

Checkpoints (comma-separated, all in one table and one plot): a train.py run
folder (config.json + checkpoints/: the newest checkpoint's params on the model
its config.json names), a folder written by save_pretrained or transformers
(config.json + model.safetensors), or a HuggingFace hub id (needs network or
the hub cache). Datasets: 'digits' (embedded) or a prepared TFDS dataset.

Writes into --outdir: results.json (all numbers, per-example outcomes, the exact
command, package versions, seed and the evaluated subset), results.md (the
table) and robustness.png (robust accuracy against eps, one line per model).
Refuses an outdir that already has results.json unless --overwrite.

Flags also take dashes (--num-examples, --data-dir, ...). A --config file is a
Python file whose get_config() returns an ml_collections.ConfigDict with any of
the flag names as fields (eps and checkpoint as strings or lists); flags given
on the command line win over the file.
"""

import fractions
import functools
import importlib.metadata
import json
import os
import platform
import re
import shlex
import sys
import time

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Optional ml_collections config file with the fields below.",
    lock_config=False)
flags.DEFINE_list("checkpoint", None, "Checkpoint(s): train.py run folder, HF folder or "
                  "hub id; comma-separated.")
flags.DEFINE_string("dataset", "digits", "'digits' (embedded) or a prepared TFDS name.")
flags.DEFINE_string("split", "test", "Dataset split to draw the evaluation subset from.")
flags.DEFINE_string("data_dir", None, "TFDS data directory (default: TFDS's own).")
flags.DEFINE_string("eps", "1/255,2/255,4/255",
                    "Budgets on [0, 1] pixels, comma-separated; fractions allowed.")
flags.DEFINE_string("suite", "standard", "Attack suite (standard, fast, pgd) or a "
                    "comma-separated list of attacks (e.g. pgd-ce,apgd-dlr).")
flags.DEFINE_enum("norm", "linf", ["linf", "l2"], "Threat model.")
flags.DEFINE_integer("num_examples", 1000, "Size of the seeded subset of the split "
                     "(0: the whole split).")
flags.DEFINE_integer("seed", 0, "Seed of the subset and of the attacks.")
flags.DEFINE_string("outdir", None, "Output folder.")
flags.DEFINE_enum("templates", "default", ["default", "imagenet"],
                  "Prompts: 'default' (\"This is a photo of a {}\") or CLIP's 80 "
                  "ImageNet templates.")
flags.DEFINE_integer("batch_size", 64, "Examples per attack call (global, over all "
                     "devices; must divide by the device count).")
flags.DEFINE_integer("steps", None, "APGD / APGD-T / PGD iterations (default 100).")
flags.DEFINE_integer("square_queries", None, "Square attack queries (default 5000).")
flags.DEFINE_bool("allow_pickle", False, "Accept pytorch_model.bin checkpoints (a pickle "
                  "can run code).")
flags.DEFINE_bool("overwrite", False, "Replace the results of an earlier run in --outdir.")
flags.DEFINE_string("coordinator_address", None, "Multi-host: 'auto' (TPU pods, SLURM) or "
                    "host:port; every host runs the same command, process 0 writes.")
flags.DEFINE_integer("num_processes", None, "Multi-host: process count.")
flags.DEFINE_integer("process_id", None, "Multi-host: this process's index.")

FLAGS = flags.FLAGS
FIELDS = ("checkpoint", "dataset", "split", "data_dir", "eps", "suite", "norm",
          "num_examples", "seed", "outdir", "templates", "batch_size", "steps",
          "square_queries", "allow_pickle", "overwrite")
_DASHABLE = FIELDS + ("coordinator_address", "num_processes", "process_id")
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


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
  return FLAGS(undash(argv))


def settings():
  """Flag values, with --config fields where the flag was not on the command line."""
  config = _CONFIG.value
  out = {}
  for name in FIELDS:
    value = FLAGS[name].value
    if not FLAGS[name].present and config is not None and name in config:
      value = config[name]
    out[name] = value
  return out


def parse_eps(value):
  """'1/255,2/255' or [1/255, 0.5] -> [floats]; fractions read with Fraction (no eval)."""
  items = value.split(",") if isinstance(value, str) else list(value)
  eps = []
  for item in items:
    try:
      e = float(fractions.Fraction(str(item).strip()))
    except (ValueError, ZeroDivisionError) as e:
      raise ValueError(f"--eps: cannot read {item!r} as a number or fraction like 4/255") from e
    if e < 0:
      raise ValueError(f"--eps: budgets must be >= 0, got {item!r}")
    eps.append(e)
  if not eps:
    raise ValueError("--eps is empty")
  return eps


def parse_suite(value):
  if isinstance(value, str):
    return value if "," not in value else [s.strip() for s in value.split(",") if s.strip()]
  return list(value)


def resolve_checkpoint(spec):
  """What a --checkpoint names, checked without loading it: dict(kind, path[, model])."""
  path = os.path.expanduser(str(spec).strip())
  if os.path.isdir(path):
    config_json = os.path.join(path, "config.json")
    if os.path.isdir(os.path.join(path, "checkpoints")):
      if not os.path.isfile(config_json):
        raise FileNotFoundError(f"train.py run folder {path!r} has checkpoints/ but no "
                                "config.json naming the model it started from")
      with open(config_json) as f:
        config = json.load(f)
      model = (config.get("model") or {}).get("path") or config.get("model.path")
      if not model:
        raise ValueError(f"{config_json} has no model.path (the HF checkpoint the run "
                         "fine-tuned)")
      model = os.path.expanduser(model)
      if not os.path.isdir(model) and os.path.isdir(os.path.join(path, model)):
        model = os.path.join(path, model)
      if not os.path.isdir(model) and not _HUB_ID.fullmatch(model):
        raise FileNotFoundError(f"run {path!r} was started from model {model!r}, which is "
                                "neither a folder nor a hub id")
      return {"kind": "workdir", "path": path, "model": model}
    if os.path.isfile(config_json):
      return {"kind": "hf", "path": path}
    runs = sorted(d for d in os.listdir(path)
                  if os.path.isdir(os.path.join(path, d, "checkpoints")))
    if runs:
      raise ValueError(f"{path!r} holds the train.py runs {runs}; pass one of them, e.g. "
                       f"{os.path.join(path, runs[0])} (or its export/ folder)")
    raise FileNotFoundError(f"checkpoint folder {path!r} has neither checkpoints/ (a "
                            "train.py run) nor config.json (a HuggingFace checkpoint)")
  if os.path.exists(path):
    raise NotADirectoryError(f"checkpoint {path!r} is a file; pass its folder")
  looks_local = path.startswith((".", "/", "~")) or os.path.isdir(path.split("/")[0])
  if _HUB_ID.fullmatch(path) and not looks_local:
    return {"kind": "hub", "path": path}
  raise FileNotFoundError(f"checkpoint {spec!r} not found: no such folder, and not a "
                          "hub id (org/name)")


def load_model(ckpt, allow_pickle):
  """(clip, params) for a resolved checkpoint."""
  from prsl_jax import checkpoints  # pylint: disable=g-import-not-at-top
  from prsl_jax.models.convert import load_pretrained  # pylint: disable=g-import-not-at-top
  if ckpt["kind"] == "workdir":
    clip = load_pretrained(ckpt["model"], allow_pickle=allow_pickle)
    return clip, checkpoints.restore_params(ckpt["path"], clip)
  clip = load_pretrained(ckpt["path"], allow_pickle=allow_pickle)
  return clip, clip.params


# CLIP config -> logits_fn (see main); module level, so repeated main() calls in
# one process (tests, notebooks) reuse the compiled functions too.
_LOGITS_FNS = {}


def _zero_shot_logits(clip, params, images):
  from prsl_jax import zeroshot  # pylint: disable=g-import-not-at-top
  return zeroshot.logits(clip, params["model"], params["classes"], images)


def versions():
  out = {"python": platform.python_version()}
  for pkg in ("prsl_jax", "jax", "jaxlib", "flax", "numpy", "optax", "orbax-checkpoint",
              "transformers", "tensorflow-datasets", "grain"):
    try:
      out[pkg] = importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
      out[pkg] = None
  return out


def model_names(specs):
  """Table row names: the checkpoint as given, made unique."""
  names = []
  for spec in specs:
    name = str(spec).rstrip("/") or str(spec)
    while name in names:
      name += "'"
    names.append(name)
  return names


def validate(s):
  """Every check that needs no model or data; raises with the flag's name."""
  from prsl_jax import evaluation  # pylint: disable=g-import-not-at-top
  specs = s["checkpoint"]
  if isinstance(specs, str):
    specs = [c for c in specs.split(",") if c.strip()]
  if not specs:
    raise ValueError("--checkpoint is required (a train.py run, HF folder or hub id)")
  if not s["outdir"]:
    raise ValueError("--outdir is required")
  if os.path.exists(os.path.join(s["outdir"], "results.json")) and not s["overwrite"]:
    raise FileExistsError(f"{s['outdir']}/results.json exists; pass --overwrite to replace "
                          "it or choose another --outdir")
  eps = parse_eps(s["eps"])
  suite = evaluation.resolve_suite(parse_suite(s["suite"]), s["norm"])
  if s["num_examples"] is not None and s["num_examples"] < 0:
    raise ValueError(f"--num_examples must be >= 0 (0: all), got {s['num_examples']}")
  if s["batch_size"] < 1:
    raise ValueError(f"--batch_size must be >= 1, got {s['batch_size']}")
  for name in ("steps", "square_queries"):
    if s[name] is not None and s[name] < 1:
      raise ValueError(f"--{name} must be >= 1, got {s[name]}")
  if s["templates"] not in ("default", "imagenet"):
    raise ValueError(f"--templates must be default or imagenet, got {s['templates']!r}")
  ckpts = [resolve_checkpoint(c) for c in specs]
  return specs, ckpts, eps, suite


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # orbax and TFDS log at INFO
  t0 = time.time()
  s = settings()
  # Everything that can be checked without compute, first.
  specs, ckpts, eps, suite = validate(s)
  from prsl_jax import data  # pylint: disable=g-import-not-at-top
  from prsl_jax import sharding  # pylint: disable=g-import-not-at-top
  # Before anything touches a JAX backend (loading a checkpoint does).
  sharding.maybe_initialize_distributed(FLAGS.coordinator_address, FLAGS.num_processes,
                                        FLAGS.process_id)
  data_dir = s["data_dir"] or None
  source, class_names = data.load(s["dataset"], s["split"], image_size=224,
                                  data_dir=data_dir)
  if not class_names:
    raise ValueError(f"dataset {s['dataset']!r} has no class labels to classify")
  num = s["num_examples"] or None
  indices = data.eval_indices(len(source), num, s["seed"])

  import jax  # pylint: disable=g-import-not-at-top
  from prsl_jax import evaluation  # pylint: disable=g-import-not-at-top
  from prsl_jax import zeroshot  # pylint: disable=g-import-not-at-top
  mesh = sharding.make_mesh()
  if s["batch_size"] % mesh.devices.size:
    raise ValueError(f"--batch_size={s['batch_size']} must be divisible by the number of "
                     f"devices ({mesh.devices.size})")
  templates = zeroshot.IMAGENET_TEMPLATES if s["templates"] == "imagenet" else None

  results = {}
  for name, ckpt in zip(model_names(specs), ckpts):
    print(f"{name}: loading ({ckpt['kind']})", flush=True)
    clip, params = load_model(ckpt, s["allow_pickle"])
    source, _ = data.load(s["dataset"], s["split"], image_size=clip.image_size,
                          data_dir=data_dir)
    class_emb = zeroshot.class_embeddings(clip, params, class_names, templates)
    # One logits_fn per architecture: CLIP's functions are pure in the params, so
    # checkpoints of one config share it and evaluation compiles it once. The
    # class embeddings travel with the params (replicated on the mesh).
    logits_fn = _LOGITS_FNS.setdefault(clip.config,
                                       functools.partial(_zero_shot_logits, clip))
    res = evaluation.evaluate(
        logits_fn,
        {"model": params, "classes": class_emb}, source, indices,
        eps_list=eps, suite=suite, norm=s["norm"], seed=s["seed"],
        batch_size=s["batch_size"], mesh=mesh, steps=s["steps"],
        square_queries=s["square_queries"])
    res.pop("indices")  # stored once, at the top level
    results[name] = dict(res, checkpoint=ckpt, image_size=clip.image_size)

  if jax.process_index() != 0:
    return  # every process holds the same results; one writes them
  outdir = s["outdir"]
  os.makedirs(outdir, exist_ok=True)
  table = evaluation.format_table(results)
  title = (f"Zero-shot accuracy (%) on {len(indices)} {s['dataset']} {s['split']} examples "
           f"(seed {s['seed']}); {s['norm']} budgets on [0, 1] pixels; attacks: "
           f"{', '.join(suite)}.")
  with open(os.path.join(outdir, "results.md"), "w") as f:
    f.write(f"{title}\n\n{table}")
  evaluation.plot(results, os.path.join(outdir, "robustness.png"))
  record = {
      "command": shlex.join([sys.executable] + sys.argv),
      "argv": sys.argv,
      "cwd": os.getcwd(),
      "versions": versions(),
      "devices": [str(d) for d in jax.devices()],
      "settings": dict({k: v for k, v in s.items() if k != "overwrite"},
                       checkpoint=specs, eps=eps, suite=suite,
                       templates=list(templates or zeroshot.DEFAULT_TEMPLATES)),
      "config_file": (config_flags.get_config_filename(FLAGS["config"])
                      if FLAGS["config"].present else None),
      "seed": s["seed"],
      "indices": [int(i) for i in indices],
      "class_names": list(class_names),
      "models": results,
      "seconds": time.time() - t0,
  }
  with open(os.path.join(outdir, "results.json"), "w") as f:
    json.dump(record, f, indent=1, default=str)
  print(f"\n{title}\n\n{table}\nwrote {outdir}/results.json, results.md, robustness.png")
  failed = [n for n, r in results.items() if not r["checks"]["passed"]]
  if failed:
    print(f"WARNING: soundness checks failed for {failed}; see checks in results.json")


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
