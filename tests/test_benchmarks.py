"""The zero-shot benchmark's records: class counts against TFDS, templates,
names, the named lists and protocols."""

import collections

import pytest

from prsl_jax import benchmarks
from prsl_jax import evaluation

# OpenAI's ImageNet names (and so CLIP_benchmark's) repeat two: 'missile'
# (657 missile, 744 projectile) and 'sunglasses' (836 sunglass, 837 sunglasses).
CLIP_IMAGENET_REPEATS = {"missile": [657, 744], "sunglasses": [836, 837]}


def test_class_counts_match_tfds():
  tfds = pytest.importorskip("tensorflow_datasets")
  for d in benchmarks.DATASETS.values():
    # builder(...).info reads the dataset's metadata shipped with TFDS: no download.
    label = tfds.builder(d.tfds_name).info.features["label"]
    if d.labels is None:
      assert d.num_classes == label.num_classes, d.name
    else:
      assert len(d.labels) == d.num_classes < label.num_classes, d.name
      assert list(d.labels) == sorted(set(d.labels)) and d.labels[-1] < label.num_classes


def test_imagenet_r_is_its_200_classes():
  d = benchmarks.get_dataset("imagenet_r")
  assert d.num_classes == 200 and d.tfds_name == "imagenet_r"
  names = dict(zip(d.labels, d.class_names))
  assert names[1] == "goldfish" and names[2] == "great white shark" and names[988] == "acorn"
  assert 0 not in names  # tench is not an ImageNet-R class


def test_templates_and_names():
  known = {"cifar10": 10, "cifar100": 100, "stl10": 10, "caltech101": 102,
           "oxford_iiit_pet": 37, "oxford_flowers102": 102, "dtd": 47, "eurosat": 10,
           "patch_camelyon": 2, "cars196": 196, "food101": 101, "sun397": 397,
           "imagenet2012": 1000, "imagenet_r": 200, "imagenet_sketch": 1000}
  assert {n: d.num_classes for n, d in benchmarks.DATASETS.items()} == known
  for name, d in benchmarks.DATASETS.items():
    assert d.name == name
    assert d.templates and all(t.count("{}") == 1 for t in d.templates), name
    assert d.tecoa_template.count("{}") == 1, name
    assert len(set(d.templates)) == len(d.templates), name
    assert all(t.format("x") != t for t in d.templates)
    assert d.num_examples == (5000 if name == "imagenet2012" else 1000)
    counts = collections.Counter(d.class_names)
    repeats = {n: [i for i, m in enumerate(d.class_names) if m == n]
               for n, c in counts.items() if c > 1}
    expected = CLIP_IMAGENET_REPEATS if name in ("imagenet2012", "imagenet_sketch") else {}
    assert repeats == expected, (name, repeats)
  assert len(benchmarks.TEMPLATES["imagenet1k"]) == 80
  assert benchmarks.DATASETS["imagenet2012"].templates == benchmarks.TEMPLATES["imagenet1k"]


def test_benchmarks_name_records_and_list_the_missing():
  for name, names in benchmarks.BENCHMARKS.items():
    assert len(set(names)) == len(names), name
    assert set(names) <= set(benchmarks.DATASETS), name
    assert not set(names) & set(benchmarks.NOT_IN_TFDS)
  assert len(benchmarks.BENCHMARKS["fare"]) == 13  # ImageNet + 13 zero-shot - FGVC
  assert len(benchmarks.BENCHMARKS["tecoa"]) == 13  # TeCoA's 17 - 4 not in TFDS
  missing = {n for n, v in benchmarks.NOT_IN_TFDS.items() if "tecoa" in v[:-1]}
  assert missing == {"fgvc_aircraft", "caltech256", "country211", "hateful_memes"}
  assert [d.name for d in benchmarks.resolve("fare")] == list(benchmarks.BENCHMARKS["fare"])
  assert [d.name for d in benchmarks.resolve("cifar10, dtd")] == ["cifar10", "dtd"]
  with pytest.raises(ValueError, match="not in TFDS"):
    benchmarks.resolve("cifar10,fgvc_aircraft")
  with pytest.raises(ValueError, match="unknown dataset 'cifar11'"):
    benchmarks.resolve("cifar11")
  with pytest.raises(ValueError, match="named twice"):
    benchmarks.resolve("dtd,dtd")
  with pytest.raises(ValueError, match="benchmark name"):
    benchmarks.resolve(" ")


def test_protocols_name_known_suites():
  assert set(benchmarks.PROTOCOLS) == {"tecoa", "fare", "standard"}
  for name, p in benchmarks.PROTOCOLS.items():
    assert p.name == name and p.templates in ("benchmark", "tecoa", "default")
    for suite in p.suites:
      evaluation.make_suite(suite)  # a suite or attack the evaluator knows
    assert all(0 < e <= 4 / 255 for e in p.eps)
  fare = benchmarks.get_protocol("fare")
  assert fare.eps == (2 / 255, 4 / 255) and fare.steps == 100 and fare.num_targets == 9
  assert evaluation.SUITES["fast"] == ("apgd-ce", "apgd-t")
  tecoa = benchmarks.get_protocol("tecoa")
  assert tecoa.eps == (1 / 255,) and tecoa.steps == 100 and "pgd-ce" in tecoa.suites
  assert benchmarks.get_dataset("dtd").tecoa_template == "A surface with a {} texture."
  assert benchmarks.get_dataset("cifar10").tecoa_template == "This is a photo of a {}"
  assert benchmarks.get_protocol("standard").suites == ("standard",)
  with pytest.raises(ValueError, match="unknown protocol"):
    benchmarks.get_protocol("tgazsr")


def _settings(**kw):
  from prsl_jax import eval_settings  # pylint: disable=g-import-not-at-top
  return dict(eval_settings.DEFAULTS, **kw)


def test_a_protocol_sets_what_no_flag_sets_and_records_the_flags_that_win():
  from prsl_jax import evaluator  # pylint: disable=g-import-not-at-top
  s = _settings(benchmark="tecoa", protocol="tecoa", steps=7)
  protocol, plans, overrides = evaluator.resolve_datasets(s)
  assert protocol.name == "tecoa" and overrides == ["steps"]
  assert s["eps"] == [1 / 255] and s["suite"] == ["pgd-ce", "standard"] and s["steps"] == 7
  assert s["num_targets"] == 9 and s["square_queries"] == 5000 and s["templates"] == "tecoa"
  assert [d["name"] for d in plans] == list(benchmarks.BENCHMARKS["tecoa"])
  by_name = {d["name"]: d for d in plans}
  assert by_name["dtd"]["templates"] == ["A surface with a {} texture."]
  assert by_name["eurosat"]["split"] == "train[21600:]"
  assert by_name["eurosat"]["tfds_name"] == "eurosat/rgb"
  assert by_name["imagenet2012"]["num_examples"] == 5000
  assert by_name["cifar10"]["num_examples"] == 1000
  # TeCoA's PGD: 1/255 steps (the evaluator's default is 2.5 eps / steps).
  suites = evaluator.parse_suites(s["suite"], steps=2, pgd_step_size=protocol.pgd_step_size)
  assert suites["pgd-ce"][0].step_size == 1 / 255
  assert all(a.step_size is None for a in suites["standard"])


def test_several_datasets_take_their_own_templates_and_one_keeps_the_defaults():
  from prsl_jax import evaluator, zeroshot  # pylint: disable=g-import-not-at-top
  s = _settings(dataset="cifar10,stl10", num_examples=12)
  protocol, plans, _ = evaluator.resolve_datasets(s)
  assert protocol is None and s["eps"] == "1/255,2/255,4/255"
  assert [d["templates"] for d in plans] == [list(benchmarks.TEMPLATES["cifar10"]),
                                             list(benchmarks.TEMPLATES["stl10"])]
  assert [d["num_examples"] for d in plans] == [12, 12]
  for dataset in ("digits", "cifar10"):  # one dataset: the flags' defaults, as before
    s = _settings(dataset=dataset)
    _, (plan,), _ = evaluator.resolve_datasets(s)
    assert plan["templates"] == list(zeroshot.DEFAULT_TEMPLATES)
    assert (s["split"], s["num_examples"]) == ("test", 1000)
  s = _settings(dataset="digits", protocol="standard")  # no templates of its own
  _, (plan,), _ = evaluator.resolve_datasets(s)
  assert plan["templates"] == list(zeroshot.DEFAULT_TEMPLATES) and s["suite"] == ["standard"]
  with pytest.raises(ValueError, match="not both"):
    evaluator.resolve_datasets(_settings(dataset="cifar10", benchmark="fare"))
  with pytest.raises(ValueError, match="unknown --benchmark 'faer'"):
    evaluator.resolve_datasets(_settings(benchmark="faer"))


def test_fare_runs_apgd_ce_alone_on_two_class_sets():
  from prsl_jax import evaluator  # pylint: disable=g-import-not-at-top
  suites = evaluator.parse_suites(["fast", "standard"], steps=2)
  fare, tecoa = benchmarks.get_protocol("fare"), benchmarks.get_protocol("tecoa")
  two = evaluator.dataset_suites(fare, suites, 2)
  assert [a.name for a in two["fast"]] == ["apgd-ce"]
  assert [a.name for a in two["standard"]] == ["apgd-ce", "fab-t", "square"]
  assert evaluator.dataset_suites(fare, suites, 10) is suites
  assert evaluator.dataset_suites(tecoa, suites, 2) is suites
  assert evaluator.dataset_suites(None, suites, 2) is suites


def test_the_benchmark_table_averages_the_zero_shot_sets():
  from prsl_jax import reports  # pylint: disable=g-import-not-at-top
  def entry(clean, robust, passed=True):
    return {"clean_accuracy": clean, "checks": {"passed": passed},
            "robust": {"fast": [{"eps": 2 / 255, "robust_accuracy": robust}]}}
  record = {"datasets": {
      "imagenet2012": {"models": {"m": entry(0.5, 0.25)}},
      "cifar10": {"models": {"m": entry(0.75, 0.5)}},
      "dtd": {"models": {"m": entry(0.25, 0.0, passed=False)}},
      "stl10": {"models": {}}}}  # not done yet
  summary = reports.benchmark_summary(record)["m"]
  assert summary["clean"]["average"] == 0.5 and summary["robust"]["fast"]["2/255"] == {
      "imagenet2012": 0.25, "cifar10": 0.5, "dtd": 0.0, "average": 0.25}
  lines = reports.format_benchmark_table(record).splitlines()
  assert lines[2] == "|  | imagenet2012 | cifar10 | dtd | stl10 | average |"
  assert lines[4] == "| clean | 50.0 | 75.0 | 25.0 | – | 50.0 |"
  assert lines[5] == f"| {reports.SUITE_LABELS['fast']} ε=2/255 | 25.0 | 50.0 | 0.0 | – | 25.0 |"
  assert lines[7] == ("Average over the zero-shot sets (imagenet2012 outside it). Soundness "
                      "checks: failed on dtd.")
