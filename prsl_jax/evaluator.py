"""Evaluate checkpoints (ours or HuggingFace's) under attack and write the record.

    record = evaluator.run(settings)     # what `python evaluate.py` does

`settings` is a dict with the evaluate.py flag names (see DEFAULTS). In order:
`preflight` checks everything that needs no compute (budgets, suites, every
checkpoint's folder and weight-file header, the dataset, a writable outdir), so
a bad input fails before a model is evaluated; then each model is loaded and
evaluated in turn, and results.json / results.md are rewritten after each one,
so a later failure keeps the finished models ("complete": false until the end).
"""

import dataclasses
import fractions
import importlib.metadata
import json
import os
import platform
import shlex
import sys
import time

import jax
import numpy as np

import prsl_jax
from prsl_jax import benchmarks
from prsl_jax import checkpoints
from prsl_jax import data
from prsl_jax import eval_settings
from prsl_jax import evaluation
from prsl_jax import finetune_losses
from prsl_jax import losses
from prsl_jax import reports
from prsl_jax import sharding
from prsl_jax import tasks
from prsl_jax import zeroshot
from prsl_jax.models import convert
from prsl_jax.models import vision_weights

DEFAULTS = eval_settings.DEFAULTS  # evaluate.py's flags and their defaults
TEMPLATES = ("default", "imagenet", "benchmark", "tecoa")

RESULTS = "results.json"


def parse_eps(value, norm="linf"):
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
    if norm == "linf" and e > 1:
      raise ValueError(f"--eps: {item!r} exceeds 1, the whole [0, 1] pixel range; budgets are "
                       "in [0, 1] pixel units (write 4/255, not 4)")
    evaluation.warn_unusual_budget(f"--eps {item}", e, norm)
    eps.append(e)
  if not eps:
    raise ValueError("--eps is empty")
  return eps


def parse_suites(value, norm="linf", *, task=tasks.TASKS["classification"], steps=None,
                 queries=None, num_targets=None, train_loss=None, pgd_step_size=None):
  """--suite values -> {label: tuple of Attack}; each value is one cascade of `task`'s.

  pgd_step_size: PGD's step in pixel units (a protocol's, e.g. TeCoA's 1/255).
  """
  values = task.default_suites if value is None else (
      [value] if isinstance(value, str) else list(value))
  if not values:
    raise ValueError("--suite is empty")
  out = {}
  for v in values:
    names = evaluation.suite_spec(v)
    kw = dict(steps=steps, queries=queries, num_targets=num_targets, train_loss=train_loss)
    out[v] = task.make_suite(names, norm, **kw)
    if pgd_step_size is not None:
      out[v] = tuple(dataclasses.replace(a, step_size=pgd_step_size)
                     if a.name.startswith("pgd") else a for a in out[v])
  return out


# ----------------------------------------------------------------------------
# Checkpoints.
# ----------------------------------------------------------------------------


def _read_json(path, what):
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ValueError(f"{what} {path} cannot be read as JSON: {e}") from None


def resolve_checkpoint(spec):
  """What a --checkpoint names, checked without loading it: dict(kind, path[, model])."""
  path = os.path.expanduser(str(spec).strip())
  if os.path.isdir(path):
    config_json = os.path.join(path, "config.json")
    if os.path.isdir(os.path.join(path, "checkpoints")):
      if not os.path.isfile(config_json):
        raise FileNotFoundError(f"train.py run folder {path!r} has checkpoints/ but no "
                                "config.json naming the model it started from")
      config = _read_json(config_json, "run config")
      model = (config.get("model") or {}).get("path")
      if not model:
        raise ValueError(f"{config_json} has no model.path (the HF checkpoint the run "
                         "fine-tuned)")
      model = os.path.expanduser(model)
      if not os.path.isdir(model) and os.path.isdir(os.path.join(path, model)):
        model = os.path.join(path, model)
      if not os.path.isdir(model) and not convert.is_hub_id(model):
        raise FileNotFoundError(f"run {path!r} was started from model {model!r}, which is "
                                "neither a folder nor a hub id")
      return {"kind": "workdir", "path": path, "model": model,
              "train_loss": config.get("loss")}
    if os.path.isfile(config_json) or convert.checkpoint_format(path) == "open_clip":
      out = {"kind": "hf", "path": path}
      loss_file = os.path.join(path, checkpoints.TRAINING_LOSS)
      if os.path.isfile(loss_file):
        out["train_loss"] = _read_json(loss_file, "training loss")
      return out
    runs = sorted(d for d in os.listdir(path)
                  if os.path.isdir(os.path.join(path, d, "checkpoints")))
    if runs:
      raise ValueError(f"{path!r} holds the train.py runs {runs}; pass one of them, e.g. "
                       f"{os.path.join(path, runs[0])} (or its export/ folder)")
    raise FileNotFoundError(f"checkpoint folder {path!r} has neither checkpoints/ (a "
                            "train.py run) nor config.json (a HuggingFace checkpoint) nor "
                            "open_clip_config.json (an open_clip folder)")
  if os.path.exists(path):
    raise NotADirectoryError(f"checkpoint {path!r} is a file; pass its folder")
  if convert.is_hub_id(path):
    return {"kind": "hub", "path": path}
  raise FileNotFoundError(f"checkpoint {spec!r} not found: no such folder, and not a "
                          "hub id (org/name)")


def train_loss_of(ckpt):
  """(name, kwargs) of the loss a checkpoint was trained with, or None (cross-entropy;
  FARE's and PMG-AFT's models too: finetune_losses.paper_attack_loss)."""
  return finetune_losses.paper_attack_loss(ckpt.get("train_loss"))


def check_folder(folder, allow_pickle):
  """config.json parses and names a supported kind; the weights' header parses."""
  if convert.checkpoint_format(folder) == "open_clip":
    model_type = convert.model_type(folder)  # refuses an unsupported architecture
    convert.check_weights(folder, allow_pickle=allow_pickle)
    return model_type
  cfg = _read_json(os.path.join(folder, convert.CONFIG_NAME), "checkpoint config")
  if not isinstance(cfg, dict) or cfg.get("model_type") not in convert.MODEL_KINDS:
    got = cfg.get("model_type") if isinstance(cfg, dict) else None
    raise ValueError(f"{folder}/config.json has model_type={got!r}; prsl_jax evaluates "
                     f"{sorted(convert.MODEL_KINDS)}")
  convert.check_weights(folder, allow_pickle=allow_pickle)
  return cfg["model_type"]


def check_not_train_output(outdir, given):
  """evaluate.py never writes into train.py's folders (even with --overwrite)."""
  is_run = os.path.isdir(os.path.join(outdir, "checkpoints"))
  runs = is_run or (os.path.isdir(outdir) and any(
      os.path.isdir(os.path.join(outdir, d, "checkpoints")) for d in os.listdir(outdir)))
  kind = None
  if os.path.isfile(os.path.join(outdir, RESULTS)):
    try:
      with open(os.path.join(outdir, RESULTS)) as f:
        kind = json.load(f).get("kind")
    except (OSError, ValueError, AttributeError):
      pass
  if runs or kind == "train":
    raise ValueError(f"--outdir {given!r} is a train.py run folder; choose another")


def _plan(name, record, s, templates):
  """One dataset of the run: what to load and how to prompt it (a dict)."""
  split = s["split"] or (record.split if record else eval_settings.FALLBACKS["split"])
  num = s["num_examples"]
  if num is None:
    num = record.num_examples if record else eval_settings.FALLBACKS["num_examples"]
  if templates in ("benchmark", "tecoa") and record is None:
    raise ValueError(f"--templates {templates} needs a dataset of the benchmark "
                     f"({sorted(benchmarks.DATASETS)}), got {name!r}")
  prompts = {"default": zeroshot.DEFAULT_TEMPLATES, "imagenet": zeroshot.IMAGENET_TEMPLATES,
             "benchmark": record and record.templates,
             "tecoa": record and (record.tecoa_template,)}[templates]
  return dict(name=name, tfds_name=record.tfds_name if record else name, split=split,
              num_examples=num, templates=list(prompts),
              class_names=list(record.class_names) if record else None,
              labels=list(record.labels) if record and record.labels else None)


def resolve_datasets(s):
  """Fills s's eps, suite, steps, ... from --protocol where the flag is None, and
  split, num_examples, templates; -> (Protocol or None, dataset plans, the
  flags that overrode the protocol). Several datasets: --dataset a,b,c or
  --benchmark (prsl_jax.benchmarks), each with its own split, subset size,
  class names and templates."""
  if s["benchmark"] and s["dataset"] not in (None, DEFAULTS["dataset"]):
    raise ValueError(f"give --dataset or --benchmark, not both (got --dataset "
                     f"{s['dataset']} and --benchmark {s['benchmark']})")
  if s["benchmark"] and s["benchmark"] not in benchmarks.BENCHMARKS:
    raise ValueError(f"unknown --benchmark {s['benchmark']!r}; choose one of "
                     f"{sorted(benchmarks.BENCHMARKS)} or list datasets with --dataset a,b")
  protocol = benchmarks.get_protocol(s["protocol"]) if s["protocol"] else None
  spec = s["benchmark"] or s["dataset"]
  multi = bool(s["benchmark"]) or "," in str(spec)
  overrides = []
  if protocol is not None:
    for flag, value in (("eps", list(protocol.eps) or None), ("suite", list(protocol.suites)),
                        ("steps", protocol.steps), ("num_targets", protocol.num_targets),
                        ("square_queries", protocol.queries),
                        ("templates", protocol.templates)):
      if s[flag] is None:
        s[flag] = value
      elif value is not None:
        overrides.append(flag)
    if not multi and spec not in benchmarks.DATASETS and "templates" not in overrides:
      s["templates"] = "default"  # a dataset outside the benchmark has no templates of its own
  if s["eps"] is None:
    s["eps"] = eval_settings.FALLBACKS["eps"]
  if s["templates"] is None:
    s["templates"] = "benchmark" if multi else "default"
  if s["templates"] not in TEMPLATES:
    raise ValueError(f"--templates must be one of {list(TEMPLATES)}, got {s['templates']!r}")
  if multi:
    plans = [_plan(d.name, d, s, s["templates"]) for d in benchmarks.resolve(spec)]
  else:
    plans = [_plan(spec, benchmarks.DATASETS.get(spec), s, s["templates"])]
    s["split"], s["num_examples"] = plans[0]["split"], plans[0]["num_examples"]
  return protocol, plans, overrides


def check_prepared(plans, data_dir, multi):
  """Every dataset of the run can be read; several: one error naming each that
  cannot, with its prepare command, before any compute."""
  if not multi:
    data.check_available(plans[0]["tfds_name"], plans[0]["split"], data_dir=data_dir)
    return
  missing = []
  for d in plans:
    try:
      data.check_available(d["tfds_name"], d["split"], data_dir=data_dir)
    except (FileNotFoundError, ValueError) as e:
      fix = (data.prepare_command(d["tfds_name"], data_dir) if isinstance(e, FileNotFoundError)
             else " ".join(str(e).split())[:200])
      missing.append(f"{d['name']} ({fix})")
  if missing:
    raise FileNotFoundError(
        f"{len(missing)} of the {len(plans)} datasets cannot be read in data_dir={data_dir!r}: "
        f"{'; '.join(missing)}. Prepare each once as ArrayRecord (TFDS needs tensorflow to "
        "write most: pip install tensorflow-cpu), then run this again")


def _jsonable(value):
  return json.loads(json.dumps(value, default=str))


def resumable(path, settings, given, multi):
  """The record at `path` when this run finishes it (several datasets, the same
  settings), else a one-line error saying what to do."""
  again = (f"pass --overwrite to start afresh or choose another --outdir than {given!r}")
  if not multi:
    raise FileExistsError(f"{given}/{RESULTS} exists; pass --overwrite to replace it or "
                          "choose another --outdir")
  try:
    with open(path) as f:
      record = json.load(f)
  except (OSError, ValueError) as e:
    raise ValueError(f"{path} cannot be read ({e}); {again}") from None
  if not isinstance(record, dict) or "datasets" not in record:
    raise FileExistsError(f"{given}/{RESULTS} holds a single-dataset evaluation; {again}")
  old, new = record.get("settings") or {}, _jsonable(settings)
  # The folder may have moved (or been copied) since: its name is no setting.
  changed = sorted(k for k in set(old) | set(new)
                   if k != "outdir" and old.get(k) != new.get(k))
  if changed:
    raise ValueError(f"{given}/{RESULTS} was written with other settings ({', '.join(changed)} "
                     f"differ), so its datasets cannot be resumed; rerun its own command "
                     f"({record.get('command', '?')}) to finish it, or {again}")
  return record


def preflight(settings):
  """Every check that needs no compute; raises with the flag's name.

  Returns:
    dict(specs, ckpts, eps, suites): the resolved inputs.
  """
  s = dict(DEFAULTS, **{k: v for k, v in settings.items() if v is not None})
  specs = s["checkpoint"]
  if isinstance(specs, str):
    specs = [c for c in specs.split(",") if c.strip()]
  if not specs:
    raise ValueError("--checkpoint is required (a train.py run, HF folder or hub id)")
  if not s["outdir"]:
    raise ValueError("--outdir is required")
  outdir = os.path.abspath(os.path.expanduser(s["outdir"]))
  if os.path.exists(outdir) and not os.path.isdir(outdir):
    raise NotADirectoryError(f"--outdir {s['outdir']!r} is a file; pass a folder")
  check_not_train_output(outdir, s["outdir"])
  parent = outdir
  while not os.path.exists(parent):
    parent = os.path.dirname(parent)
  if not os.access(parent, os.W_OK | os.X_OK):
    raise PermissionError(f"--outdir {s['outdir']!r} cannot be written ({parent} is not "
                          "writable); choose another folder")
  checkpoints.check_outputs_writable(outdir, "--outdir")
  losses.check_int("--batch_size", s["batch_size"], minimum=1)
  if s["num_examples"] is not None and s["num_examples"] < 0:
    raise ValueError(f"--num_examples must be >= 0 (0: all), got {s['num_examples']}")
  for name in ("steps", "square_queries", "num_targets"):
    if s[name] is not None and s[name] < 1:
      raise ValueError(f"--{name} must be >= 1, got {s[name]}")
  protocol, plans, overrides = resolve_datasets(s)
  if s["norm"] not in evaluation.attacks.NORMS:
    raise ValueError(f"--norm must be one of {list(evaluation.attacks.NORMS)}, got "
                     f"{s['norm']!r}")
  eps = parse_eps(s["eps"], s["norm"])
  if s["vision_weights"]:
    vision_weights.check_file(s["vision_weights"], allow_pickle=s["allow_pickle"])
  ckpts = [resolve_checkpoint(c) for c in specs]
  kinds = set()
  for ckpt in ckpts:
    train_loss_of(ckpt)  # a stored loss we cannot rebuild fails now
    folder = ckpt.get("model", ckpt["path"])
    if ckpt["kind"] == "hub" or (ckpt["kind"] == "workdir" and convert.is_hub_id(folder)):
      folder = convert.resolve_folder(folder, s["allow_pickle"])  # downloads if online
      ckpt["folder"] = folder
    ckpt["model_type"] = check_folder(folder, s["allow_pickle"])
    kinds.add(ckpt["model_type"])
    if ckpt["kind"] == "workdir":
      checkpoints.check_workdir(ckpt["path"])
  if len(kinds) > 1:
    raise ValueError(f"--checkpoint mixes kinds of model {sorted(kinds)}; evaluate "
                     "classifiers (CLIP) and captioners in separate runs")
  kind = kinds.pop()
  task = tasks.for_model(convert.model_class(kind))  # once, from the checkpoint's model
  if s["norm"] not in task.norms:
    raise ValueError(f"{kind} models are attacked in {'/'.join(task.norms)} only "
                     f"(--norm {task.norms[0]})")
  multi = len(plans) > 1 or bool(s["benchmark"])
  if multi and task.name != "classification":
    raise ValueError(f"several datasets in one run are for classifiers; evaluate {kind} "
                     "models on one --dataset at a time")
  parse_suites(s["suite"], s["norm"], task=task, steps=s["steps"],
               queries=s["square_queries"], num_targets=s["num_targets"],
               pgd_step_size=protocol and protocol.pgd_step_size)
  check_prepared(plans, s["data_dir"], multi)
  if s["batch_size"] % jax.device_count():
    raise ValueError(f"--batch_size={s['batch_size']} must be divisible by the number of "
                     f"devices ({jax.device_count()})")
  record_settings = dict({k: v for k, v in s.items() if k != "overwrite"},
                         checkpoint=specs, eps=eps)
  if multi:
    record_settings["datasets"] = [d["name"] for d in plans]
  else:
    record_settings["templates"] = list(plans[0]["templates"])
  resume = None
  if os.path.exists(os.path.join(outdir, RESULTS)) and not s["overwrite"]:
    resume = resumable(os.path.join(outdir, RESULTS), record_settings, s["outdir"], multi)
  os.makedirs(outdir, exist_ok=True)  # last: a refused run leaves nothing behind
  return dict(settings=s, specs=specs, ckpts=ckpts, eps=eps, outdir=outdir, kind=kind,
              task=task, protocol=protocol, plans=plans, multi=multi, overrides=overrides,
              record_settings=record_settings, resume=resume)


def load_model(ckpt, allow_pickle, tower_file=None):
  """(Pretrained, params) for a resolved checkpoint; a train.py run's ckpt gets "step",
  the step of the checkpoint evaluated (results.json records it). tower_file:
  a vision tower file put on a checkpoint folder's CLIP (--vision_weights)."""
  if ckpt["kind"] == "workdir":
    pretrained = prsl_jax.load_pretrained(ckpt.get("folder", ckpt["model"]),
                                          allow_pickle=allow_pickle)
    params, ckpt["step"] = checkpoints.restore_params_and_step(ckpt["path"], pretrained.model)
    return pretrained, params
  pretrained = vision_weights.load_on(
      prsl_jax.load_pretrained(ckpt.get("folder", ckpt["path"]), allow_pickle=allow_pickle),
      tower_file, allow_pickle=allow_pickle)
  return pretrained, pretrained.params


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


def _write(outdir, record, title, results, final, task):
  """results.json and results.md, each replaced atomically; the plot at the end.

  A partial write removes the plot an earlier run (--overwrite) left, so the
  folder holds one run's files: the previous run's until this run's first write,
  then this run's.
  """
  table = task.format_table(results) if results else ""
  for name, text in ((RESULTS, json.dumps(record, indent=1, default=str)),
                     ("results.md", f"{title}\n\n{table}")):
    reports.write_atomic(os.path.join(outdir, name), text)
  plot_path = os.path.join(outdir, "robustness.png")
  if final and results:
    task.plot(results, plot_path)
  elif os.path.exists(plot_path):  # an --overwrite run's earlier plot: never a mix of runs
    os.remove(plot_path)
  return table


def protocol_record(p):
  """The protocol's record and the flags that overrode it (None without --protocol)."""
  if p["protocol"] is None:
    return None
  return dict(dataclasses.asdict(p["protocol"]), overridden_by=p["overrides"])


def make_suites(p, ckpt):
  s = p["settings"]
  return parse_suites(s["suite"], s["norm"], task=p["task"], steps=s["steps"],
                      queries=s["square_queries"], num_targets=s["num_targets"],
                      train_loss=train_loss_of(ckpt),
                      pgd_step_size=p["protocol"] and p["protocol"].pgd_step_size)


class _Relabeled:
  """A source whose labels are positions in `labels` (a subset of a larger label
  space, e.g. ImageNet-R's 200 of ImageNet's 1000)."""

  def __init__(self, source, labels):
    self._source, self._index = source, {int(t): i for i, t in enumerate(labels)}

  def __len__(self):
    return len(self._source)

  def raw(self, i):  # what data.check_split reads
    image, label = self._source.raw(i)
    return image, self._index.get(label, -1)

  def __getitem__(self, i):
    item = dict(self._source[i])
    item["label"] = np.int32(self._index.get(int(item["label"]), -1))  # -1: check_split names it
    return item


def load_dataset(plan, image_size, data_dir):
  """(source, class names) of a dataset plan: the benchmark's class names where it
  has a record, else the dataset's own."""
  source, class_names = data.load(plan["tfds_name"], plan["split"], image_size=image_size,
                                  data_dir=data_dir)
  if plan["labels"]:
    source = _Relabeled(source, plan["labels"])
  return source, plan["class_names"] or class_names


def run(settings, *, argv=None, checked=None):
  """Evaluates every checkpoint; returns the record written to results.json.

  checked: what preflight(settings) returned, when the caller ran it already
  (evaluate.py does, before starting JAX's distributed runtime): it runs once.
  """
  t0 = time.time()
  p = preflight(settings) if checked is None else checked
  s = p["settings"]
  if s["batch_size"] % jax.device_count():  # every host's devices, once distributed
    raise ValueError(f"--batch_size={s['batch_size']} must be divisible by the number of "
                     f"devices ({jax.device_count()})")
  s, eps, outdir = p["settings"], p["eps"], p["outdir"]
  mesh = sharding.make_mesh()
  argv = list(sys.argv if argv is None else argv)
  if p["multi"]:
    return run_benchmark(p, argv=argv, mesh=mesh, t0=t0)
  plan = p["plans"][0]
  templates = plan["templates"]
  num = s["num_examples"] or None
  record = {
      "kind": "evaluate",
      "model_kind": p["kind"],
      "command": shlex.join([sys.executable] + argv),
      "argv": argv,
      "cwd": os.getcwd(),
      "versions": versions(),
      "devices": [str(d) for d in jax.devices()],
      "settings": p["record_settings"],
      "protocol": protocol_record(p),
      "seed": s["seed"],
      "models": {},
      "complete": False,
  }
  results = {}
  indices = None
  title = ""
  task = p["task"]
  # Every later checkpoint loads and fits its model before the first is evaluated
  # (the first is loaded just below): a broken last one must not cost the others' run.
  for ckpt in p["ckpts"][1:]:
    # raises for a missing, damaged or unfitting one (or a vision tower that does not fit it)
    load_model(ckpt, s["allow_pickle"], s["vision_weights"])
  for name, ckpt in zip(model_names(p["specs"]), p["ckpts"]):
    print(f"{name}: loading ({ckpt['kind']})", flush=True)
    pretrained, params = load_model(ckpt, s["allow_pickle"], s["vision_weights"])
    model = pretrained.model
    source, class_names = load_dataset(plan, model.image_size, s["data_dir"])
    if not class_names and task.needs_class_names:
      raise ValueError(f"dataset {s['dataset']!r} has no class labels to classify")
    if indices is None:
      indices = data.eval_indices(len(source), num, s["seed"])
      data.check_split(source, class_names, name=s["dataset"], split=s["split"],
                       indices=indices)  # bad pixels or labels, before any compute
      record.update(indices=[int(i) for i in indices],
                    class_names=list(class_names) if class_names else None)
      title = (f"{task.title} on {len(indices)} {s['dataset']} {s['split']} examples (seed "
               f"{s['seed']}); {s['norm']} budgets on [0, 1] pixels.")
    suites = make_suites(p, ckpt)
    result = task.evaluate(
        model, params, pretrained.tokenizer, source, indices, class_names=class_names,
        templates=templates, eps_list=eps, suites=suites, norm=s["norm"], seed=s["seed"],
        batch_size=s["batch_size"], mesh=mesh,
        options=dict(max_length=s["max_length"], target_caption=s["target_caption"],
                     prompt=s["prompt"]))
    results[name] = result
    entry = result.to_dict()
    entry.pop("indices")  # stored once, at the top level
    record["models"][name] = dict(entry, checkpoint=ckpt, image_size=model.image_size)
    del pretrained, params
    if jax.process_index() == 0:
      record["seconds"] = time.time() - t0
      _write(outdir, record, title, results, final=False, task=task)
  record["complete"] = True
  record["seconds"] = time.time() - t0
  table = ""
  if jax.process_index() == 0:
    table = _write(outdir, record, title, results, final=True, task=task)
  if jax.process_index() == 0:  # the only writer
    print(f"\n{title}\n\n{table}\nwrote {outdir}/{RESULTS}, results.md, robustness.png",
          flush=True)
  failed = [n for n, r in results.items() if not r.checks.passed]
  if failed:
    print(f"WARNING: soundness checks failed for {failed}; see checks in {RESULTS}")
  return record



# ----------------------------------------------------------------------------
# Several datasets in one run (--dataset a,b,c or --benchmark).
# ----------------------------------------------------------------------------

# Classifiers with fewer real classes keep their own logit width: the DLR
# losses need 3 (APGD-T's targeted one 4) real classes, and fall back to the
# cross-entropy below that (a decision made at trace time, from the width).
MIN_PADDED_CLASSES = 4


def pad_width(plans, suites):
  """The class count every dataset of the run with >= MIN_PADDED_CLASSES classes
  is padded to (their max), so the attacks compile once for all of them; None
  when nothing is padded (one dataset, or an attack through the model's own
  training loss, which sees every column)."""
  if any(a.loss is not None for suite in suites.values() for a in suite):
    return None
  counts = [len(d["class_names"]) for d in plans
            if len(d["class_names"]) >= MIN_PADDED_CLASSES]
  return max(counts) if len(counts) > 1 else None


def dataset_suites(protocol, suites, num_classes):
  """The suites a dataset of `num_classes` classes runs: FARE's protocol runs
  APGD-CE alone on 2-class sets (CLIP_benchmark's zeroshot_classification.py
  drops APGD-T there: its one target is the other class); otherwise `suites`."""
  if protocol is None or protocol.name != "fare" or num_classes > 2:
    return suites
  return {k: tuple(a for a in v if a.name != "apgd-t") or v for k, v in suites.items()}


def _benchmark_write(outdir, record, final):
  title = reports.benchmark_title(record)
  table = reports.format_benchmark_table(record)
  for name, text in ((RESULTS, json.dumps(record, indent=1, default=str)),
                     ("results.md", f"{title}\n\n{table}")):
    reports.write_atomic(os.path.join(outdir, name), text)
  plot_path = os.path.join(outdir, "robustness.png")
  if final and any(ds["models"] for ds in record["datasets"].values()):
    reports.plot_benchmark(record, plot_path)
  elif os.path.exists(plot_path):
    os.remove(plot_path)
  return title, table


def run_benchmark(p, *, argv, mesh, t0):
  """Every checkpoint on every dataset of the plan; results.json is rewritten
  (atomically) after each (dataset, checkpoint), and a rerun of the same command
  skips the pairs it holds and evaluates the rest.

  Record (results.json): the run's provenance and settings as for one dataset,
  "protocol" (its settings and the flags that overrode them), "pad_classes",
  "datasets": {name: {tfds_name, split, num_examples, class_names, templates,
  indices, models: {model: the one-dataset entry (clean, robust per suite and
  eps, per-example outcomes, checks, timing)}}}, "models": {model: checkpoint},
  "summary": {model: {"clean": {dataset: accuracy, "average": ...}, "robust":
  {suite: {eps: {dataset: accuracy, "average": ...}}}}} (reports.benchmark_summary)
  and "complete".
  """
  s, outdir, task = p["settings"], p["outdir"], p["task"]
  names = model_names(p["specs"])
  record = p["resume"]
  now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
  if record is None:
    record = {
        "kind": "evaluate", "model_kind": p["kind"],
        "command": shlex.join([sys.executable] + argv), "argv": argv, "cwd": os.getcwd(),
        "versions": versions(), "devices": [str(d) for d in jax.devices()],
        "settings": _jsonable(p["record_settings"]), "protocol": protocol_record(p),
        "benchmark": s["benchmark"], "seed": s["seed"], "pad_classes": None,
        "datasets": {d["name"]: dict({k: v for k, v in d.items() if k != "name"}, models={})
                     for d in p["plans"]},
        "models": {}, "summary": {}, "complete": False, "runs": []}
  done = [(d, m) for d, ds in record["datasets"].items() for m in ds["models"]]
  record["runs"].append({"started": now, "argv": argv, "already_done": len(done)})
  if done:
    print(f"{RESULTS}: resuming, {len(done)} of {len(names) * len(p['plans'])} "
          "(dataset, checkpoint) results done and kept", flush=True)
  record["complete"] = False
  todo = {n: [d for d in p["plans"] if n not in record["datasets"][d["name"]]["models"]]
          for n in names}
  for ckpt, name in zip(p["ckpts"][1:], names[1:]):
    if todo[name]:  # a broken later checkpoint fails before the first one's compute
      load_model(ckpt, s["allow_pickle"], s["vision_weights"])
  sources = {}
  for name, ckpt in zip(names, p["ckpts"]):
    if not todo[name]:
      continue
    print(f"{name}: loading ({ckpt['kind']})", flush=True)
    pretrained, params = load_model(ckpt, s["allow_pickle"], s["vision_weights"])
    model = pretrained.model
    suites = make_suites(p, ckpt)
    pad = pad_width(p["plans"], suites)
    record["pad_classes"] = pad
    for plan in todo[name]:
      entry = record["datasets"][plan["name"]]
      if plan["name"] not in sources:
        source, class_names = load_dataset(plan, model.image_size, s["data_dir"])
        indices = data.eval_indices(len(source), plan["num_examples"] or None, s["seed"])
        data.check_split(source, class_names, name=plan["name"], split=plan["split"],
                         indices=indices)  # bad pixels or labels, before its compute
        sources[plan["name"]] = (source, class_names, indices)
        entry.update(class_names=list(class_names), indices=[int(i) for i in indices])
      source, class_names, indices = sources[plan["name"]]
      print(f"{name} on {plan['name']} ({len(indices)} {plan['split']} examples, "
            f"{len(class_names)} classes)", flush=True)
      result = task.evaluate(
          model, params, pretrained.tokenizer, source, indices, class_names=class_names,
          templates=plan["templates"], eps_list=p["eps"],
          suites=dataset_suites(p["protocol"], suites, len(class_names)), norm=s["norm"],
          seed=s["seed"], batch_size=s["batch_size"], mesh=mesh,
          options=dict(pad_classes=pad if len(class_names) >= MIN_PADDED_CLASSES else None))
      out = result.to_dict()
      out.pop("indices")  # stored once per dataset
      entry["models"][name] = out
      record["models"][name] = dict(checkpoint=ckpt, image_size=model.image_size)
      record["summary"] = reports.benchmark_summary(record)
      record["runs"][-1]["seconds"] = time.time() - t0
      if jax.process_index() == 0:
        _benchmark_write(outdir, record, final=False)
    del pretrained, params
  record["summary"] = reports.benchmark_summary(record)
  record["complete"] = True
  record["runs"][-1]["seconds"] = time.time() - t0
  if jax.process_index() == 0:
    title, table = _benchmark_write(outdir, record, final=True)
    print(f"\n{title}\n\n{table}\nwrote {outdir}/{RESULTS}, results.md, robustness.png",
          flush=True)
  failed = [(d, m) for d, ds in record["datasets"].items() for m, r in ds["models"].items()
            if not r["checks"]["passed"]]
  if failed:
    print(f"WARNING: soundness checks failed for {failed}; see checks in {RESULTS}")
  return record
