"""evaluate.py end to end, in subprocesses (absl flags are process-global).

A tiny random HF CLIP (conftest's tiny_ckpt) and a train.py-style orbax run
folder made from it are evaluated on the embedded digits in one call, then the
HF one on tfds.testing.mock_data's CIFAR-10 (both calls in one process); a
second process feeds the CLI bad input and checks each fails before any compute.
"""

import json
import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from tests import processes

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EVALUATE = os.path.join(REPO, "evaluate.py")
TINY = ["--batch-size", "8", "--steps", "2", "--square-queries", "10"]


def _run(argv, *, driver=None, timeout=500):
  env = processes.env()
  cmd = [sys.executable] + ([driver] if driver else [EVALUATE]) + argv
  proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True,
                        timeout=timeout)
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
  return proc


def _flipped_run(tiny_ckpt, tiny_clip, path):
  """A train.py run folder whose checkpoint is the tiny CLIP with its image
  projection negated (so its predictions differ from the HF folder's)."""
  from prsl_jax import checkpoints  # pylint: disable=g-import-not-at-top
  params = jax.tree.map(np.asarray, tiny_clip.params)
  params["visual_projection"] = jax.tree.map(np.negative, params["visual_projection"])
  os.makedirs(path)
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump({"seed": 0, "model": {"path": tiny_ckpt.path}}, f)
  mgr = checkpoints.manager(path)
  state = {"params": params, "opt": {"count": np.zeros((), np.int32)},
           "step": np.int32(7), "rng": np.zeros((2,), np.uint32)}
  checkpoints.save(mgr, state, {"position": 0})
  mgr.wait_until_finished()
  mgr.close()
  return params


def _clean_correct(clip, params, dataset_name, indices):
  """Per example, is the zero-shot prediction right? Computed directly."""
  from prsl_jax import data, zeroshot  # pylint: disable=g-import-not-at-top
  source, names = data.load(dataset_name, "test", image_size=clip.model.image_size)
  batch = next(data.eval_batches(source, np.asarray(indices), len(indices)))
  emb = zeroshot.class_embeddings(clip.model, params, clip.tokenizer, names)
  pred = np.argmax(zeroshot.logits(clip.model, params, emb, batch["image"]), -1)
  return (pred == batch["label"]).tolist()


# Runs evaluate.py's main() once per argv list in one process, all inside
# tfds.testing.mock_data (the digits never touch TFDS): the runs share imports
# and compiled functions, which is most of the time.
_DRIVER = textwrap.dedent("""
    import importlib.util, json, sys
    import tensorflow_datasets as tfds
    spec = importlib.util.spec_from_file_location("evaluate_cli", sys.argv[1])
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    with tfds.testing.mock_data(num_examples=16):
      for argv in json.loads(sys.argv[2]):
        cli.FLAGS.unparse_flags()
        sys.argv = [spec.origin] + argv  # what results.json records
        cli.main(cli.parse_flags(sys.argv))
""")


@pytest.fixture(scope="session")
def cli_runs(tiny_ckpt, tiny_clip, tmp_path_factory):
  """Two evaluate.py calls: digits with two checkpoints, mock CIFAR-10."""
  tmp = tmp_path_factory.mktemp("cli")
  run_dir = str(tmp / "run" / "prsl")
  flipped = _flipped_run(tiny_ckpt, tiny_clip, run_dir)
  digits = ["--checkpoint", f"{tiny_ckpt.path},{run_dir}", "--dataset", "digits",
            "--eps", "0,2/255,8/255", "--suite", "fgsm,square", "--num-examples", "24",
            "--seed", "1", "--outdir", str(tmp / "digits"),
            "--compilation_cache_dir", str(tmp / "jax_cache")] + TINY
  cifar = ["--checkpoint", tiny_ckpt.path, "--dataset", "cifar10", "--eps", "4/255",
           "--suite", "fgsm", "--num_examples", "12", "--outdir", str(tmp / "cifar"),
           "--templates", "imagenet"] + TINY
  driver = tmp / "driver.py"
  driver.write_text(_DRIVER)
  proc = _run([EVALUATE, json.dumps([digits, cifar])], driver=str(driver))
  return dict(proc=proc, digits=digits, run_dir=run_dir, flipped=flipped,
              digits_out=str(tmp / "digits"), cifar_out=str(tmp / "cifar"),
              cache=str(tmp / "jax_cache"))


def _outputs(outdir):
  assert sorted(os.listdir(outdir)) == ["results.json", "results.md", "robustness.png"]
  with open(os.path.join(outdir, "robustness.png"), "rb") as f:
    assert f.read(4) == b"\x89PNG"
  with open(os.path.join(outdir, "results.md")) as f:
    md = f.read()
  with open(os.path.join(outdir, "results.json")) as f:
    return json.load(f), md


@pytest.mark.heavy(50, alone=False)  # the cli_runs fixture
def test_digits_two_checkpoints_one_table_one_plot(cli_runs, tiny_ckpt, tiny_clip):
  res, md = _outputs(cli_runs["digits_out"])
  run_dir = cli_runs["run_dir"]
  # Provenance: exact command, versions, seed, the subset.
  assert res["argv"][1:] == cli_runs["digits"]
  assert "--num-examples 24" in res["command"] and EVALUATE in res["command"]
  assert res["versions"]["jax"] == jax.__version__
  assert res["seed"] == 1 and res["settings"]["eps"] == [0.0, 2 / 255, 8 / 255]
  from prsl_jax import data  # pylint: disable=g-import-not-at-top
  assert res["indices"] == data.eval_indices(359, 24, 1).tolist()
  assert res["class_names"] == list(data.DIGIT_NAMES)

  hf, run = res["models"][tiny_ckpt.path], res["models"][run_dir]
  assert (hf["checkpoint"]["kind"], run["checkpoint"]["kind"]) == ("hf", "workdir")
  assert run["checkpoint"]["model"] == tiny_ckpt.path
  assert run["checkpoint"]["step"] == 7  # the step of the checkpoint evaluated
  # The numbers are the models' own: clean predictions recomputed here, directly
  # (at eps=0 the robust points are exactly the clean-correct ones).
  want_hf = _clean_correct(tiny_clip, tiny_clip.params, "digits", res["indices"])
  want_run = _clean_correct(tiny_clip, cli_runs["flipped"], "digits", res["indices"])
  assert want_hf != want_run  # the run folder's params really are different
  for r, want in ((hf, want_hf), (run, want_run)):
    (suite,) = r["robust"].values()
    assert suite[0]["robust_mask"] == want
    assert r["clean_accuracy"] == pytest.approx(np.mean(want))
    acc = [e["robust_accuracy"] for e in suite]
    assert acc[0] == r["clean_accuracy"] >= acc[1] >= acc[2]
    assert [a["name"] for a in r["suites"]["fgsm,square"]] == ["fgsm", "square"]
    assert r["suites"]["fgsm,square"][1]["queries"] == 10
    assert r["checks"]["eps0_ok"] and r["checks"]["ball_ok"]
  assert res["complete"]

  assert f"| {tiny_ckpt.path} | fgsm,square | {100 * np.mean(want_hf):.1f} |" in md
  assert f"| {run_dir} | fgsm,square | {100 * np.mean(want_run):.1f} |" in md
  assert "ε=8/255" in md
  assert "24 digits test examples" in md
  assert md.split("\n\n", 1)[1] in cli_runs["proc"].stdout  # the table is printed


def test_compilation_cache_flags(cli_runs, tmp_path):
  # --compilation_cache_dir: the digits run's programs were written there.
  assert len(os.listdir(cli_runs["cache"])) >= 3
  # On by default (in $PRSL_JAX_CACHE), off with --nocompilation_cache.
  code = ("import sys, jax; from absl import flags; from prsl_jax import cli; "
          "flags.FLAGS(['x'] + sys.argv[1:]); cli.setup_compilation_cache(); "
          "print('DIR', jax.config.jax_compilation_cache_dir)")
  env = processes.env(PRSL_JAX_CACHE=str(tmp_path / "default"))
  out = [subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True,
                        text=True, timeout=120).stdout.split("DIR ", 1)[1].strip()
         for args in ([], ["--nocompilation_cache"])]
  assert out == [str(tmp_path / "default"), "None"]
  # A cache folder that cannot be created (a read-only HOME; here under a file,
  # since root may write anywhere): one warning line, and the run goes on without.
  (tmp_path / "a_file").write_text("")
  env = processes.env(PRSL_JAX_CACHE=str(tmp_path / "a_file" / "cache"))
  proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                        timeout=120)
  assert proc.stdout.split("DIR ", 1)[1].strip() == "None", proc.stderr[-2000:]
  line, = proc.stderr.strip().splitlines()
  assert line.startswith(f"warning: no compilation cache: {tmp_path / 'a_file' / 'cache'} "
                         "cannot be written") and "--compilation_cache_dir" in line


def test_cpu_devices_are_set_before_the_backend_and_the_users_count_wins():
  # evaluate.py passes cpu_devices (auto: one per core dividing the batch); an
  # $XLA_FLAGS that already sets the count (here the tests' 1) is left alone.
  code = ("from absl import flags; from prsl_jax import cli; flags.FLAGS(['x']); "
          "cli.setup_compilation_cache(cpu_devices=3); import jax; print('N', jax.device_count())")
  counts = [subprocess.run([sys.executable, "-c", code], env=processes.env(devices), text=True,
                           capture_output=True, timeout=120).stdout.split("N ", 1)[1].strip()
            for devices in (None, 1)]
  assert counts == ["3", "1"]


def test_tfds_mock_cifar10(cli_runs):
  res, md = _outputs(cli_runs["cifar_out"])
  from prsl_jax import classnames  # pylint: disable=g-import-not-at-top
  assert res["class_names"] == list(classnames.CIFAR10)
  assert len(res["indices"]) == 12 and len(res["settings"]["templates"]) == 80
  (r,) = res["models"].values()
  assert list(r["suites"]) == ["fgsm"] and r["num_examples"] == 12
  assert 0 <= r["robust"]["fgsm"][0]["robust_accuracy"] <= r["clean_accuracy"] <= 1
  assert "12 cifar10 test examples" in md


_ERRORS_DRIVER = textwrap.dedent("""
    import importlib.util, json, os, sys, time
    spec = importlib.util.spec_from_file_location("evaluate_cli", sys.argv[1])
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    cases = json.loads(sys.argv[2])
    out = {}
    for name, argv in cases.items():
      cli.FLAGS.unparse_flags()
      t0 = time.time()
      try:
        cli.parse_flags(["evaluate.py"] + argv)
        cli.main(["evaluate.py"])
        out[name] = ("ok", "", time.time() - t0)
      except Exception as e:  # pylint: disable=broad-except
        out[name] = (type(e).__name__, str(e), time.time() - t0)
    print("RESULT" + json.dumps(out))
""")


def test_bad_input_fails_before_compute(tiny_ckpt, tmp_path):
  fresh = str(tmp_path / "fresh")  # must never be created
  done = tmp_path / "done"
  done.mkdir()
  (done / "results.json").write_text("{}")
  runs = tmp_path / "train_out"
  (runs / "prsl" / "checkpoints").mkdir(parents=True)
  (runs / "ce" / "checkpoints").mkdir(parents=True)
  empty_tfds = tmp_path / "tfds"
  empty_tfds.mkdir()
  config = tmp_path / "eval_config.py"
  config.write_text(textwrap.dedent(f"""
      import ml_collections
      def get_config():
        return ml_collections.ConfigDict(dict(
            checkpoint={tiny_ckpt.path!r}, outdir={fresh!r}, eps="1/255,-4/255",
            suite="strongest"))
  """))
  ok = ["--checkpoint", tiny_ckpt.path, "--outdir", fresh]
  cases = {
      "unknown_suite": ok + ["--suite", "strongest"],
      "unknown_attack": ok + ["--suite", "apgd-ce,fab"],
      "negative_eps": ok + ["--eps", "1/255,-2/255"],
      "code_as_eps": ok + ["--eps", "__import__('os').getcwd()"],
      "zero_denominator": ok + ["--eps", "1/0"],
      "fgsm_l2": ok + ["--suite", "fgsm", "--norm", "l2"],
      "missing_checkpoint": ["--checkpoint", str(tmp_path / "nope"), "--outdir", fresh],
      "train_output_folder": ["--checkpoint", str(runs), "--outdir", fresh],
      "not_prepared": ok + ["--dataset", "cifar10", "--data-dir", str(empty_tfds)],
      "results_exist": ["--checkpoint", tiny_ckpt.path, "--outdir", str(done)],
      "no_checkpoint": ["--outdir", fresh],
      "config_file_read": ["--config", str(config)],
      "flag_beats_config": ["--config", str(config), "--eps", "2/255"],
  }
  driver = tmp_path / "errors_driver.py"
  driver.write_text(_ERRORS_DRIVER)
  proc = _run([EVALUATE, json.dumps(cases)], driver=str(driver), timeout=300)
  out = json.loads(proc.stdout.split("RESULT", 1)[1])
  expect = {
      "unknown_suite": ("ValueError", "unknown suite 'strongest'"),
      "unknown_attack": ("ValueError", "['fab']"),
      "negative_eps": ("ValueError", ">= 0"),
      "code_as_eps": ("ValueError", "cannot read"),
      "zero_denominator": ("ValueError", "cannot read '1/0'"),
      "fgsm_l2": ("ValueError", "linf"),
      "missing_checkpoint": ("FileNotFoundError", "not found"),
      "train_output_folder": ("ValueError", "['ce', 'prsl']"),
      "not_prepared": ("FileNotFoundError", "not prepared"),
      "results_exist": ("FileExistsError", "--overwrite"),
      "no_checkpoint": ("ValueError", "--checkpoint is required"),
      "config_file_read": ("ValueError", "'-4/255'"),
      "flag_beats_config": ("ValueError", "unknown suite 'strongest'"),
  }
  for name, (kind, text) in expect.items():
    got_kind, message, seconds = out[name]
    assert (got_kind, text in message) == (kind, True), (name, out[name])
    assert seconds < 30, (name, seconds)  # no model loaded, nothing compiled
  assert not os.path.exists(fresh)
  assert (done / "results.json").read_text() == "{}"


def test_class_names_follow_tfds_label_order():
  """The names the CLI prompts with line up with TFDS's label indices."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from prsl_jax import classnames  # pylint: disable=g-import-not-at-top
  tfds_names = {}
  for name, names in classnames.CLASSNAMES.items():
    label = tfds.builder(name).info.features["label"]  # code only, no data needed
    assert label.num_classes == len(names), name
    tfds_names[name] = label.names
  # Same order, CLIP's spelling of the TFDS label.
  for name in ("food101", "dtd", "resisc45", "oxford_iiit_pet", "cars196"):
    assert classnames.get(name) == tuple(n.replace("_", " ") for n in tfds_names[name])
  sun = [n[3:].replace("_", " ").replace("/", " ") for n in tfds_names["sun397"]]
  assert classnames.get("sun397") == tuple(sun)
  # Where CLIP's list is in another order or spelling, by label name.
  def name_of(dataset, tfds_label):
    return classnames.get(dataset)[tfds_names[dataset].index(tfds_label)]
  assert name_of("eurosat", "SeaLake") == "lake or sea"
  assert name_of("eurosat", "HerbaceousVegetation") == "brushland or shrubland"
  assert name_of("caltech101", "faces_easy") == "centered face"
  assert name_of("caltech101", "background_google") == "background"
  assert name_of("oxford_flowers102", "ball moss") == "air plant"
  assert name_of("imagenet2012", "n02085620") == "Chihuahua"
  assert name_of("imagenet_r", "n01443537") == "goldfish"
  assert classnames.get("eurosat/rgb:2.0.0") == classnames.EUROSAT
  assert classnames.get("not_a_set", ["a_b", "c"]) == ("a b", "c")
  with pytest.raises(KeyError):
    classnames.get("not_a_set")
  with pytest.raises(ValueError, match="classes"):
    classnames.get("cifar10", [str(i) for i in range(9)])


@pytest.mark.heavy(60, alone=False)  # two evaluate.py processes (and the cli_runs fixture)
def test_two_processes_give_what_one_does(cli_runs, tiny_ckpt, tmp_path):
  # evaluate.py across hosts: two processes on localhost, process 0 the only
  # writer, the same per-example outcomes as the one-process run of cli_runs.
  argv = list(cli_runs["digits"])
  argv[argv.index("--checkpoint") + 1] = tiny_ckpt.path
  def argvs(port):
    argv[argv.index("--outdir") + 1] = str(tmp_path / f"two{port}")
    return [[sys.executable, EVALUATE, *argv, f"--coordinator_address=localhost:{port}",
             "--num_processes=2", f"--process_id={i}", "--distributed_timeout=300"]
            for i in range(2)]
  results, report, port = processes.launch(argvs, cwd=REPO, env=processes.env())
  outdir = str(tmp_path / f"two{port}")
  for rc, _, _ in results:
    assert rc == 0, report
  outs = [(so, se) for _, so, se in results]
  assert "wrote" in outs[0][0] and "wrote" not in outs[1][0]
  two, _ = _outputs(outdir)
  one, _ = _outputs(cli_runs["digits_out"])
  a, b = two["models"][tiny_ckpt.path], one["models"][tiny_ckpt.path]
  assert a["clean_accuracy"] == b["clean_accuracy"]
  untimed = lambda r: {k: [{f: v for f, v in e.items() if not f.startswith("seconds")}
                           for e in es] for k, es in r["robust"].items()}
  assert untimed(a) == untimed(b)  # accuracy and per-example outcomes, every budget
  assert a["num_devices"] == 2 and b["num_devices"] == 1



def test_an_overwrite_run_never_leaves_a_mix_of_two_runs(tmp_path):
  # An --overwrite run that fails after its first model: its partial results.json
  # and results.md, and no plot of the previous run beside them.
  from prsl_jax import evaluator  # pylint: disable=g-import-not-at-top
  from prsl_jax import tasks  # pylint: disable=g-import-not-at-top
  for name in ("results.json", "results.md", "robustness.png"):
    (tmp_path / name).write_text("previous run")
  evaluator._write(str(tmp_path), {"complete": False}, "title", {}, final=False,  # pylint: disable=protected-access
                   task=tasks.get("classification"))
  assert sorted(os.listdir(tmp_path)) == ["results.json", "results.md"]
  assert json.loads((tmp_path / "results.json").read_text()) == {"complete": False}


def test_a_report_file_in_a_folders_place_is_found_in_the_preflight(tmp_path):
  from prsl_jax import checkpoints  # pylint: disable=g-import-not-at-top
  (tmp_path / "robustness.png").mkdir()
  with pytest.raises(IsADirectoryError, match=r"--outdir .*robustness.png is a folder where "
                     "the run writes its robustness.png"):
    checkpoints.check_outputs_writable(str(tmp_path), "--outdir")
  checkpoints.check_outputs_writable(str(tmp_path / "new" / "sub"), "--workdir")  # creatable


def test_evaluate_flags_take_their_defaults_from_the_one_table():
  # evaluate.py defines each setting's flag from prsl_jax.eval_settings.DEFAULTS,
  # the table prsl_jax.evaluator.run fills missing settings from.
  code = ("import json, sys; sys.argv = ['evaluate.py']; import evaluate; "
          "from absl import flags; from prsl_jax import eval_settings; "
          "print(json.dumps({k: [flags.FLAGS[k].default, v] "
          "for k, v in eval_settings.DEFAULTS.items()}))")
  out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=processes.env(),
                       capture_output=True, text=True, timeout=120, check=True)
  pairs = json.loads(out.stdout.strip().splitlines()[-1])
  from prsl_jax import evaluator, eval_settings  # pylint: disable=g-import-not-at-top
  assert evaluator.DEFAULTS is eval_settings.DEFAULTS
  assert set(pairs) == set(eval_settings.DEFAULTS)
  for name, (flag_default, table_default) in pairs.items():
    assert flag_default == table_default, name


# Several datasets in one run. Mock TFDS images with labels made from the tiny
# CLIP's own zero-shot predictions (a quarter of them wrong), so cascades have
# points to attack. Steps: a run of the first dataset, the three in one run, a
# run of each other dataset, then the three-dataset run cut back to its first
# dataset and resumed, then refusals.
_BENCH_DRIVER = textwrap.dedent("""
    import importlib.util, json, sys
    import numpy as np
    import tensorflow_datasets as tfds
    spec = importlib.util.spec_from_file_location("evaluate_cli", sys.argv[1])
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    import prsl_jax
    from prsl_jax import evaluator, zeroshot
    clip = prsl_jax.load_pretrained(sys.argv[3])
    load_dataset = evaluator.load_dataset

    class Source:
      def __init__(self, x, y):
        self.x, self.y = x, y
      def __len__(self):
        return len(self.y)
      def __getitem__(self, i):
        return {"image": self.x[i], "label": self.y[i]}

    def labelled(plan, image_size, data_dir):
      source, names = load_dataset(plan, image_size, data_dir)
      x = np.stack([source[i]["image"] for i in range(len(source))])
      emb = zeroshot.class_embeddings(clip.model, clip.params, clip.tokenizer, names,
                                      plan["templates"])
      y = np.array(np.argmax(zeroshot.logits(clip.model, clip.params, emb, x), -1), np.int32)
      y[::4] = (y[::4] + 1) % len(names)
      return Source(x, y), names
    evaluator.load_dataset = labelled

    out = []
    for step in json.loads(sys.argv[2]):
      if "cut" in step:  # results.json as a kill after its first dataset leaves it
        with open(step["cut"]) as f:
          record = json.load(f)
        first, *rest = record["datasets"]
        for name in rest:
          record["datasets"][name]["models"] = {}
        for r in record["datasets"][first]["models"].values():
          r["marker"] = "kept"
        record["complete"] = False
        with open(step["cut"], "w") as f:
          json.dump(record, f)
        continue
      cli.FLAGS.unparse_flags()
      sys.argv = [spec.origin] + step["argv"]
      try:
        if step.get("mock", True):
          with tfds.testing.mock_data(num_examples=16):
            cli.main(cli.parse_flags(sys.argv))
        else:
          cli.main(cli.parse_flags(sys.argv))
        out.append(None)
      except Exception as e:  # pylint: disable=broad-except
        out.append(f"{type(e).__name__}: {e}")
    print("RESULT" + json.dumps(out))
""")

_SETS = ("cifar10", "cifar100", "dtd")  # 10, 100 and 47 classes


@pytest.fixture(scope="module")
def bench_runs(tiny_ckpt, tmp_path_factory):
  tmp = tmp_path_factory.mktemp("bench")
  common = ["--checkpoint", tiny_ckpt.path, "--eps", "2/255", "--steps", "2",
            "--num_targets", "3", "--num_examples", "12", "--batch_size", "8",
            "--nocompilation_cache"]
  single = {d: common + ["--dataset", d, "--suite", "fast", "--templates", "benchmark",
                         "--outdir", str(tmp / d)] for d in _SETS}
  multi = common + ["--dataset", ",".join(_SETS), "--protocol", "fare"]
  empty = tmp / "no_data"
  empty.mkdir()
  steps = [{"argv": single["cifar10"]},
           {"argv": multi + ["--outdir", str(tmp / "multi")]},
           {"argv": single["cifar100"]}, {"argv": single["dtd"]},
           {"cut": str(tmp / "resumed" / "results.json")},
           {"argv": multi + ["--outdir", str(tmp / "resumed")]},
           {"argv": multi + ["--outdir", str(tmp / "multi"), "--seed", "3"]},
           {"argv": multi + ["--outdir", str(tmp / "unprepared"), "--data_dir", str(empty)],
            "mock": False},
           {"argv": ["--checkpoint", tiny_ckpt.path, "--benchmark", "tecoa", "--protocol",
                     "tecoa", "--data_dir", str(empty), "--outdir", str(tmp / "tecoa")],
            "mock": False}]
  # The resumed folder starts as a copy of the three-dataset run's record.
  driver = tmp / "driver.py"
  driver.write_text(_BENCH_DRIVER)
  first, rest = steps[:4], steps[4:]
  proc = _run([EVALUATE, json.dumps(first), tiny_ckpt.path], driver=str(driver))
  os.makedirs(tmp / "resumed")
  with open(tmp / "multi" / "results.json") as f:
    multi_record = json.load(f)
  with open(tmp / "resumed" / "results.json", "w") as f:
    json.dump(multi_record, f)
  proc2 = _run([EVALUATE, json.dumps(rest), tiny_ckpt.path], driver=str(driver))
  errors = json.loads(proc2.stdout.split("RESULT")[-1])
  def load(name):
    with open(tmp / name / "results.json") as f:
      return json.load(f)
  return dict(tmp=tmp, multi=multi_record, single={d: load(d) for d in _SETS},
              resumed=load("resumed"), errors=errors, proc=proc, name=tiny_ckpt.path)


def _outcomes(entry):
  return (entry["clean_accuracy"],
          {s: [(r["eps"], r["robust_accuracy"], r["broken_by"]) for r in rs]
           for s, rs in entry["robust"].items()})


@pytest.mark.heavy(120, alone=False)
def test_three_datasets_in_one_run_give_what_three_runs_give(bench_runs):
  multi, name = bench_runs["multi"], bench_runs["name"]
  assert multi["complete"] and list(multi["datasets"]) == list(_SETS)
  # --protocol fare's suites and templates, the flags given as well recorded.
  assert multi["protocol"]["name"] == "fare" and multi["settings"]["suite"] == ["fast"]
  assert multi["protocol"]["overridden_by"] == ["eps", "steps", "num_targets"]
  assert multi["settings"]["eps"] == [2 / 255] and multi["pad_classes"] == 100
  attacked = 0
  for d in _SETS:
    got, want = multi["datasets"][d], bench_runs["single"][d]
    assert got["indices"] == want["indices"] and got["class_names"] == want["class_names"]
    assert got["templates"] == want["settings"]["templates"]
    assert _outcomes(got["models"][name]) == _outcomes(want["models"][name]), d
    broken_by = got["models"][name]["robust"]["fast"][0]["broken_by"]
    attacked += sum(b not in ("clean",) for b in broken_by)
    assert got["class_names"] == list(__import__("prsl_jax.benchmarks").benchmarks
                                      .DATASETS[d].class_names)
  assert attacked >= 6  # the cascades had points to attack
  # The table: a column per dataset and the average; the summary is the same numbers.
  summary = multi["summary"][name]
  clean = [multi["datasets"][d]["models"][name]["clean_accuracy"] for d in _SETS]
  assert summary["clean"]["average"] == pytest.approx(sum(clean) / 3)
  outdir = bench_runs["tmp"] / "multi"
  res, md = _outputs(str(outdir))
  assert "|  | cifar10 | cifar100 | dtd | average |" in md
  assert f"| clean | {100 * clean[0]:.1f} | {100 * clean[1]:.1f} | {100 * clean[2]:.1f} |" in md


@pytest.mark.heavy(120, alone=False)
def test_the_attacks_compile_once_for_datasets_of_any_class_count(bench_runs):
  name = bench_runs["name"]
  one = [bench_runs["single"][d]["models"][name]["timing"]["compiles"] for d in _SETS[1:]]
  multi = [bench_runs["multi"]["datasets"][d]["models"][name]["timing"]["compiles"]
           for d in _SETS]
  # The three datasets (10, 100 and 47 classes, padded to 100) in one run compile
  # what one dataset's run does (each single run after it has shapes of its
  # own, so it compiles afresh), all on the first dataset.
  assert multi[0] > 0 and multi[1:] == [0, 0] and one == [multi[0]] * 2, (one, multi)


@pytest.mark.heavy(120, alone=False)
def test_a_rerun_after_a_kill_finishes_only_the_missing_datasets(bench_runs):
  resumed, multi, name = bench_runs["resumed"], bench_runs["multi"], bench_runs["name"]
  assert resumed["complete"] and [r["already_done"] for r in resumed["runs"]] == [0, 1]
  assert resumed["datasets"]["cifar10"]["models"][name]["marker"] == "kept"  # not redone
  for d in _SETS[1:]:
    got = resumed["datasets"][d]["models"][name]
    assert "marker" not in got
    assert _outcomes(got) == _outcomes(multi["datasets"][d]["models"][name])


@pytest.mark.heavy(120, alone=False)
def test_other_settings_and_unprepared_datasets_are_refused_before_compute(bench_runs):
  resumed, other, unprepared, tecoa = bench_runs["errors"]
  assert resumed is None
  assert other.startswith("ValueError") and "(seed differ)" in other and "--overwrite" in other
  assert "\n" not in other
  assert unprepared.startswith("FileNotFoundError: 3 of the 3 datasets cannot be read")
  for d in _SETS:
    assert f"{d} (python -c \"from prsl_jax import data; data.prepare('{d}'" in unprepared
  from prsl_jax import benchmarks  # pylint: disable=g-import-not-at-top
  assert f"{len(benchmarks.BENCHMARKS['tecoa'])} of the" in tecoa
  assert "data.prepare('eurosat/rgb'" in tecoa and "sun397" in tecoa
  for name in ("unprepared", "tecoa"):  # refused before the outdir was made
    assert not os.path.exists(bench_runs["tmp"] / name)
