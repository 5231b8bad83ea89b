"""The zero-shot robustness benchmark of the field: datasets, named lists, protocols.

Plain records, no evaluation code: the evaluator reads them.

Datasets. One `Dataset` per zero-shot set that exists in TFDS: its TFDS name and
split, class names (prsl_jax.classnames, CLIP's names in TFDS label order),
prompt templates and the subset size FARE attacks. Templates are CLIP_benchmark's
per-dataset templates (github.com/LAION-AI/CLIP_benchmark,
clip_benchmark/datasets/en_zeroshot_classification_templates.json, with its
"{c}" written "{}"); the ImageNet variants use CLIP's 80 ImageNet templates
(prsl_jax.zeroshot.IMAGENET_TEMPLATES, CLIP_benchmark's "imagenet1k" list). The
class names are CLIP's (openai/CLIP data/prompts.md), which CLIP_benchmark's
en_classnames.json also uses for these sets.

Subset sizes (FARE, github.com/chs20/RobustVLM): CLIP_benchmark/bash/
run_benchmark_adv.sh attacks the first 1,000 test images of each zero-shot set
(--n_samples 1000; clean accuracy uses the whole test set,
run_benchmark_clean.sh: --n_samples -1); CLIP_eval/clip_robustbench.py attacks
5,000 ImageNet validation images (--n_samples_imagenet 5000, RobustBench's
ImageNet subset) with the 80 templates (--template ensemble).

Named lists (BENCHMARKS):
  fare   FARE's zero-shot table: ImageNet plus CLIP_benchmark/benchmark/
         datasets.txt of chs20/RobustVLM (CIFAR-10, STL-10, CIFAR-100, Cars,
         Caltech-101, Pets, Flowers, DTD, EuroSAT, FGVC-Aircraft, PCAM,
         ImageNet-R, ImageNet-Sketch), less FGVC-Aircraft. FARE's tables put
         ImageNet (its training set) in a column of its own and average the
         zero-shot sets only.
  tecoa  TeCoA's (Mao et al., ICLR 2023; github.com/cvlab-columbia/
         ZSRobust4FoundationModel, finetuning.py, the --evaluate list of
         val_dataset_name): CIFAR-10, CIFAR-100, STL-10, SUN397, Stanford Cars,
         Food-101, Pets, Flowers, Country211, DTD, EuroSAT, FGVC-Aircraft, PCAM,
         Hateful Memes, ImageNet, Caltech-101, Caltech-256, less the four not in
         TFDS. PMG-AFT and TGA-ZSR report the same list without Country211 and
         Hateful Memes, with TinyImageNet.
  NOT_IN_TFDS names each set a paper reports that TFDS (4.9) has no builder
  for, and why it is left out.

TeCoA's prompts. TeCoA (and PMG-AFT, TGA-ZSR, which reuse its code) prompt
with one template per set: "This is a photo of a {}", or the prompt_template of
its patched torchvision datasets (DTD "A surface with a {} texture.", EuroSAT
"A centered satellite photo of {}.", ...), recorded as Dataset.tecoa_template.
Their class names differ from CLIP's in a few sets, which is not reproduced
here: EuroSAT ('a forest', 'a sea or a lake', ...), Stanford Cars (the year
dropped), PCAM (two fixed sentences instead of a template), Caltech-101 (the
background class dropped: 101 classes, TFDS keeps 102).

Protocols (PROTOCOLS): `tecoa` (eps 1/255; PGD-CE with 100 steps of 1/255 from
a random start, as TeCoA's attack_pgd and its re-runs in PMG-AFT and TGA-ZSR,
TeCoA's prompts, then AutoAttack's standard cascade), `fare` (APGD-CE + APGD-T, 100 iterations, 9
target classes, at eps 2/255 and 4/255; APGD-CE alone on 2-class sets, as
CLIP_benchmark/clip_benchmark/metrics/zeroshot_classification.py runs it) and
`standard` (AutoAttack's standard version: APGD-CE, APGD-T, FAB-T, Square).
Attack names are prsl_jax.evaluation's suites and attacks.
"""

import dataclasses
from typing import Optional

from prsl_jax import classnames
from prsl_jax import zeroshot


@dataclasses.dataclass(frozen=True)
class Dataset:
  """One zero-shot dataset of the benchmark.

  name: the key in DATASETS (the TFDS name without config).
  tfds_name: the TFDS builder name, with its config where it has one.
  split: the TFDS split to evaluate (a split slice where the test set is part
    of one split: EuroSAT's VTAB test set is train[21600:]).
  class_names: C names, in the order of `labels` (default: TFDS label order).
  templates: prompt format strings, each with one "{}".
  num_examples: FARE's subset size (the first N of the split).
  labels: TFDS label ids this set classifies among, in class_names order, when
    the TFDS label space is larger (ImageNet-R: 200 of ImageNet's 1000); the
    evaluator keeps these columns and maps label labels[i] to class i. None:
    every TFDS label, class i is label i.
  template_source: which CLIP_benchmark template list `templates` is.
  tecoa_template: TeCoA's single prompt for this set (the `prompt_template` of
    its patched torchvision datasets, replace/torchvision.datasets/*.py; the
    field's "This is a photo of a {}" where it has none).
  """
  name: str
  tfds_name: str
  split: str
  class_names: tuple
  templates: tuple
  num_examples: int = 1000
  labels: Optional[tuple] = None
  template_source: str = ""
  tecoa_template: str = "This is a photo of a {}"

  @property
  def num_classes(self) -> int:
    return len(self.class_names)


@dataclasses.dataclass(frozen=True)
class Protocol:
  """A named evaluation protocol: budgets, attacks and their settings.

  eps: L-inf budgets in [0, 1] pixel units; () means the command's --eps.
  suites: evaluation suites or attacks (prsl_jax.evaluation.SUITES / ATTACKS),
    each run as its own cascade, robust accuracy the per-example worst case.
  steps: iterations of every gradient attack.
  num_targets: target classes of APGD-T / FAB-T (None: not run).
  queries: Square's queries (None: not run).
  pgd_step_size: PGD's step in pixel units (None: the evaluator's default).
  templates: 'benchmark' (each Dataset's templates), 'tecoa' (each Dataset's
    tecoa_template) or 'default' (the field's "This is a photo of a {}").
  description: the source, in words.
  """
  name: str
  eps: tuple
  suites: tuple
  steps: int = 100
  num_targets: Optional[int] = None
  queries: Optional[int] = None
  pgd_step_size: Optional[float] = None
  templates: str = "benchmark"
  description: str = ""


# CLIP_benchmark's templates ("{c}" -> "{}"), by CLIP_benchmark's dataset key.
_REPEAT = ("a photo of a {}.", "a blurry photo of a {}.", "a black and white photo of a {}.",
           "a low contrast photo of a {}.", "a high contrast photo of a {}.",
           "a bad photo of a {}.", "a good photo of a {}.", "a photo of a small {}.",
           "a photo of a big {}.", "a photo of the {}.", "a blurry photo of the {}.",
           "a black and white photo of the {}.", "a low contrast photo of the {}.",
           "a high contrast photo of the {}.", "a bad photo of the {}.",
           "a good photo of the {}.", "a photo of the small {}.", "a photo of the big {}.")
TEMPLATES = {
    "cifar10": _REPEAT,
    "cifar100": _REPEAT,
    "imagenet1k": tuple(zeroshot.IMAGENET_TEMPLATES),
    "food101": ("a photo of {}, a type of food.",),
    "sun397": ("a photo of a {}.", "a photo of the {}."),
    "cars": ("a photo of a {}.", "a photo of the {}.", "a photo of my {}.", "i love my {}!",
             "a photo of my dirty {}.", "a photo of my clean {}.", "a photo of my new {}.",
             "a photo of my old {}."),
    "dtd": ("a photo of a {} texture.", "a photo of a {} pattern.", "a photo of a {} thing.",
            "a photo of a {} object.", "a photo of the {} texture.",
            "a photo of the {} pattern.", "a photo of the {} thing.",
            "a photo of the {} object."),
    "pets": ("a photo of a {}, a type of pet.",),
    "caltech101": (
        "a photo of a {}.", "a painting of a {}.", "a plastic {}.", "a sculpture of a {}.",
        "a sketch of a {}.", "a tattoo of a {}.", "a toy {}.", "a rendition of a {}.",
        "a embroidered {}.", "a cartoon {}.", "a {} in a video game.", "a plushie {}.",
        "a origami {}.", "art of a {}.", "graffiti of a {}.", "a drawing of a {}.",
        "a doodle of a {}.", "a photo of the {}.", "a painting of the {}.", "the plastic {}.",
        "a sculpture of the {}.", "a sketch of the {}.", "a tattoo of the {}.", "the toy {}.",
        "a rendition of the {}.", "the embroidered {}.", "the cartoon {}.",
        "the {} in a video game.", "the plushie {}.", "the origami {}.", "art of the {}.",
        "graffiti of the {}.", "a drawing of the {}.", "a doodle of the {}."),
    "flowers": ("a photo of a {}, a type of flower.",),
    "stl10": ("a photo of a {}.", "a photo of the {}."),
    "eurosat": ("a centered satellite photo of {}.", "a centered satellite photo of a {}.",
                "a centered satellite photo of the {}."),
    "pcam": ("a histopathology slide showing {}", "histopathology image of {}"),
}

# ImageNet-R's 200 classes (the wnids of github.com/hendrycks/imagenet-r) as
# indices of TFDS imagenet2012's (and imagenet_r's) 1000 labels, ascending.
IMAGENET_R_LABELS = (
    1, 2, 4, 6, 8, 9, 11, 13, 22, 23, 26, 29, 31, 39, 47, 63, 71, 76, 79, 84, 90, 94, 96, 97, 99,
    100, 105, 107, 113, 122, 125, 130, 132, 144, 145, 147, 148, 150, 151, 155, 160, 161, 162,
    163, 171, 172, 178, 187, 195, 199, 203, 207, 208, 219, 231, 232, 234, 235, 242, 245, 247,
    250, 251, 254, 259, 260, 263, 265, 267, 269, 276, 277, 281, 288, 289, 291, 292, 293, 296,
    299, 301, 308, 309, 310, 311, 314, 315, 319, 323, 327, 330, 334, 335, 337, 338, 340, 341,
    344, 347, 353, 355, 361, 362, 365, 366, 367, 368, 372, 388, 390, 393, 397, 401, 407, 413,
    414, 425, 428, 430, 435, 437, 441, 447, 448, 457, 462, 463, 469, 470, 471, 472, 476, 483,
    487, 515, 546, 555, 558, 570, 579, 583, 587, 593, 594, 596, 609, 613, 617, 621, 629, 637,
    657, 658, 701, 717, 724, 763, 768, 774, 776, 779, 780, 787, 805, 812, 815, 820, 824, 833,
    847, 852, 866, 875, 883, 889, 895, 907, 928, 931, 932, 933, 934, 936, 937, 943, 945, 947,
    948, 949, 951, 953, 954, 957, 963, 965, 967, 980, 981, 983, 988,
)


def _dataset(name, split, template_key, *, tfds_name=None, num_examples=1000, labels=None,
             tecoa="This is a photo of a {}"):
  names = classnames.get(name)
  if labels is not None:
    names = tuple(names[i] for i in labels)
  return Dataset(name=name, tfds_name=tfds_name or name, split=split, class_names=names,
                 templates=TEMPLATES[template_key], num_examples=num_examples,
                 labels=labels, template_source=template_key, tecoa_template=tecoa)


DATASETS = {d.name: d for d in (
    _dataset("cifar10", "test", "cifar10"),
    _dataset("cifar100", "test", "cifar100"),
    _dataset("stl10", "test", "stl10"),
    _dataset("caltech101", "test", "caltech101", tecoa="A photo of a {}."),
    _dataset("oxford_iiit_pet", "test", "pets", tecoa="A photo of a {}, a type of pet."),
    _dataset("oxford_flowers102", "test", "flowers",
             tecoa="A photo of a {}, a type of flower."),
    _dataset("dtd", "test", "dtd", tecoa="A surface with a {} texture."),
    # TFDS has one EuroSAT split; VTAB's (and CLIP_benchmark's vtab/eurosat) test
    # set is its last 20%.
    _dataset("eurosat", "train[21600:]", "eurosat", tfds_name="eurosat/rgb",
             tecoa="A centered satellite photo of {}."),
    _dataset("patch_camelyon", "test", "pcam"),
    _dataset("cars196", "test", "cars", tecoa="A photo of a {}."),
    _dataset("food101", "validation", "food101", tecoa="A photo of {}, a type of food."),
    _dataset("sun397", "test", "sun397"),
    _dataset("imagenet2012", "validation", "imagenet1k", num_examples=5000),
    _dataset("imagenet_r", "test", "imagenet1k", labels=IMAGENET_R_LABELS),
    _dataset("imagenet_sketch", "test", "imagenet1k"),
)}

BENCHMARKS = {
    "fare": ("imagenet2012", "cifar10", "stl10", "cifar100", "cars196", "caltech101",
             "oxford_iiit_pet", "oxford_flowers102", "dtd", "eurosat", "patch_camelyon",
             "imagenet_r", "imagenet_sketch"),
    "tecoa": ("cifar10", "cifar100", "stl10", "sun397", "cars196", "food101",
              "oxford_iiit_pet", "oxford_flowers102", "dtd", "eurosat", "patch_camelyon",
              "imagenet2012", "caltech101"),
}

# Sets the papers report that TFDS has no builder for: name -> (papers, why).
NOT_IN_TFDS = {
    "fgvc_aircraft": ("fare", "tecoa", "FGVC-Aircraft has no TFDS builder "
                      "(torchvision.datasets.FGVCAircraft or CLIP_benchmark's wds copy)"),
    "caltech256": ("tecoa", "Caltech-256 has no TFDS builder (only caltech101 and the "
                   "Caltech-UCSD birds)"),
    "country211": ("tecoa", "Country211 (OpenAI's YFCC100M geolocation subset) has no TFDS "
                   "builder"),
    "hateful_memes": ("tecoa", "Hateful Memes has no TFDS builder and is licence-gated "
                      "(Meta's terms); a 2-class image+text task, not an image class set"),
}

PROTOCOLS = {p.name: p for p in (
    Protocol(name="tecoa", eps=(1 / 255,), suites=("pgd-ce", "standard"), steps=100,
             num_targets=9, queries=5000, pgd_step_size=1 / 255, templates="tecoa",
             description="TeCoA (Mao et al., ICLR 2023) as TGA-ZSR re-runs it: eps 1/255, "
             "PGD-CE 100 steps of 1/255 from a random start (ZSRobust4FoundationModel "
             "attack_pgd), one prompt per set (Dataset.tecoa_template); plus AutoAttack's "
             "standard cascade"),
    Protocol(name="fare", eps=(2 / 255, 4 / 255), suites=("fast",), steps=100, num_targets=9,
             templates="benchmark",
             description="FARE (Schlarmann et al., ICML 2024): APGD-CE + APGD-T (100 "
             "iterations, 9 targets; APGD-CE alone on 2-class sets) at eps 2/255 and 4/255, "
             "1,000 images per zero-shot set and 5,000 of ImageNet, CLIP_benchmark's "
             "templates and CLIP's 80 for ImageNet"),
    Protocol(name="standard", eps=(), suites=("standard",), steps=100, num_targets=9,
             queries=5000, templates="benchmark",
             description="AutoAttack's standard version (APGD-CE, APGD-T, FAB-T, Square) "
             "at the command's eps"),
)}


def _choose(kind, table, name):
  if name not in table:
    raise ValueError(f"unknown {kind} {name!r}; choose one of {sorted(table)}")
  return table[name]


def get_dataset(name: str) -> Dataset:
  """The Dataset record called `name` (a key of DATASETS)."""
  if name in NOT_IN_TFDS:
    raise ValueError(f"dataset {name!r} is not in TFDS: {NOT_IN_TFDS[name][-1]}")
  return _choose("dataset", DATASETS, name)


def get_protocol(name: str) -> Protocol:
  """The Protocol record called `name` ('tecoa', 'fare', 'standard')."""
  return _choose("protocol", PROTOCOLS, name)


def resolve(spec: str) -> tuple:
  """A benchmark name ('fare', 'tecoa') or comma-separated dataset names -> Datasets.

  Raises a one-line ValueError naming an unknown or repeated dataset.
  """
  if not isinstance(spec, str) or not spec.strip():
    raise ValueError(f"expected a benchmark name {sorted(BENCHMARKS)} or comma-separated "
                     f"dataset names, got {spec!r}")
  names = BENCHMARKS.get(spec.strip()) or tuple(n.strip() for n in spec.split(","))
  repeated = sorted({n for n in names if names.count(n) > 1})
  if repeated:
    raise ValueError(f"dataset(s) {repeated} named twice in {spec!r}")
  return tuple(get_dataset(n) for n in names)
