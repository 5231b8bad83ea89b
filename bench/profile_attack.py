r"""Where an attack step's time goes: a jax.profiler trace, per-op breakdown, XLA dumps.

  python bench/profile_attack.py                         # ViT-B/32 PGD step, batch 8
  python bench/profile_attack.py --model tiny --batch 64 # the bundled tiny CLIP
  python bench/profile_attack.py --attack apgd-t         # one APGD-T call (9 targets)

Runs the jitted attack a few times under jax.profiler.trace (written to --outdir:
open it in Perfetto or TensorBoard), then sums the trace's XLA:CPU op events by
the op's kind in the optimized HLO (dot = matmuls, convolution, reduce,
transpose/copy = layout changes, fusion kinds by their root, ...), and writes the
optimized HLO beside it. Prints one JSON object (appended to bench/results.jsonl):
wall time per call, the share of each kind, and the 15 slowest ops.
"""

import argparse
import collections
import glob
import gzip
import json
import os
import re
import tempfile
import time

import common

import jax  # pylint: disable=wrong-import-position,g-import-not-at-top
import jax.numpy as jnp  # pylint: disable=wrong-import-position
import numpy as np  # pylint: disable=wrong-import-position

import prsl_jax  # pylint: disable=wrong-import-position
from prsl_jax import attacks  # pylint: disable=wrong-import-position
from prsl_jax import data  # pylint: disable=wrong-import-position
from prsl_jax import zeroshot  # pylint: disable=wrong-import-position


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--model", choices=("vitb32", "tiny"), default="vitb32")
  p.add_argument("--attack", choices=("pgd", "apgd-t"), default="pgd")
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--steps", type=int, default=10, help="PGD steps (APGD-T: per target)")
  p.add_argument("--calls", type=int, default=2, help="traced calls after compiling")
  p.add_argument("--outdir", default=None, help="trace and HLO folder (default: a temp dir)")
  p.add_argument("--no_record", action="store_true", help="do not append to results.jsonl")
  return p.parse_args(argv)


def model_and_batch(name, batch):
  """(Classifier, variables, images, labels) for the bundled tiny CLIP or ViT-B/32."""
  if name == "tiny":
    model, params, tokenizer = prsl_jax.load_pretrained(prsl_jax.TINY_CLIP)
    class_emb = zeroshot.class_embeddings(model, params, tokenizer, data.DIGIT_NAMES)
    source, _ = data.load("digits", "test", image_size=model.image_size)
    b = next(data.eval_batches(source, np.arange(batch), batch))
    images, labels = b["image"], b["label"]
  else:
    pretrained = common.make_clip()
    model, params = pretrained.model, pretrained.params
    class_emb = common.class_embeddings(1000)
    images, labels = common.images_and_labels(batch, model.image_size, 1000)
  variables = {"params": params, "class_emb": class_emb}
  classify = zeroshot.Classifier(model)
  # Labels = clean predictions, so every point is attacked as in a cascade.
  labels = np.asarray(jnp.argmax(classify(variables, images), -1), np.int32)
  return classify, variables, images, labels


def make_attack(classify, attack, steps):
  def run(variables, images, labels, key):
    fn = classify.bind(variables)
    if attack == "pgd":
      return attacks.pgd(fn, images, labels, key=key, eps=4 / 255, steps=steps)
    return attacks.apgd_targeted(fn, images, labels, key=key, eps=4 / 255, steps=steps)
  return jax.jit(run)


_OP = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+) = [^ ]+ (\w[\w-]*)\(")
_FUSION_KIND = re.compile(r"kind=(\w+)")
_CALLS = re.compile(r"calls=%?([\w.\-]+)")


# Ops that only move or reinterpret data: a fusion made of these alone is a layout
# change; one that also computes (e.g. a softmax backward written transposed) is not.
_DATA_MOVEMENT = {"parameter", "bitcast", "copy", "transpose", "reshape", "broadcast", "slice",
                  "concatenate", "dynamic-slice", "dynamic-update-slice", "pad", "constant",
                  "tuple", "get-tuple-element"}


def op_kinds(hlo_text):
  """{op name: kind} from optimized HLO: the opcode, and for fusions the opcode of
  the fused computation's root (a 'dot' fusion is a matmul with its epilogue);
  'fusion(layout)' for a fusion that only moves data."""
  roots, kinds, fusions = {}, {}, {}
  opcodes = collections.defaultdict(set)  # computation -> opcodes inside it
  computation = None
  for line in hlo_text.splitlines():
    if line and not line.startswith(" ") and "{" in line:
      computation = line.split()[0].lstrip("%") if not line.startswith("ENTRY") else \
          line.split()[1].lstrip("%")
      continue
    m = _OP.match(line)
    if not m:
      continue
    name, opcode = m.groups()
    kinds[name] = opcode
    if computation:
      opcodes[computation].add(opcode)
    if "ROOT" in line and computation:
      roots[computation] = opcode
    if opcode == "fusion":
      c = _CALLS.search(line)
      k = _FUSION_KIND.search(line)
      fusions[name] = (c.group(1) if c else None, k.group(1) if k else "")
  for name, (called, kind) in fusions.items():
    root = roots.get(called, "?")
    if called in opcodes and opcodes[called] <= _DATA_MOVEMENT:
      kinds[name] = "fusion(layout)"
    else:
      kinds[name] = f"fusion({root})" if kind != "kOutput" else f"fusion({root}, output)"
  return kinds


def trace_events(logdir):
  """(name, duration in us) of every complete event in the perfetto trace."""
  files = glob.glob(os.path.join(logdir, "**", "*.trace.json.gz"), recursive=True)
  files += glob.glob(os.path.join(logdir, "**", "perfetto_trace.json.gz"), recursive=True)
  if not files:
    return []
  with gzip.open(sorted(files)[-1], "rt") as f:
    trace = json.load(f)
  events = trace["traceEvents"] if isinstance(trace, dict) else trace
  return [(e["name"], float(e.get("dur", 0))) for e in events
          if e.get("ph") == "X" and "name" in e]


def category(kind):
  """Coarse groups of op kinds for the summary."""
  if "dot" in kind:
    return "matmul (dot)"
  if "convolution" in kind:
    return "convolution"
  if kind == "fusion(layout)" or kind in ("transpose", "copy"):
    return "layout (transpose/copy only)"
  if "reduce" in kind:
    return "reduction"
  if kind.startswith("fusion"):
    return "elementwise fusion"
  return kind


def main(argv=None):
  args = parse_args(argv)
  outdir = args.outdir or tempfile.mkdtemp(prefix="prsl_profile_")
  os.makedirs(outdir, exist_ok=True)
  classify, variables, images, labels = model_and_batch(args.model, args.batch)
  run = make_attack(classify, args.attack, args.steps)
  key = jax.random.key(0)
  t0 = time.perf_counter()
  compiled = run.lower(variables, images, labels, key).compile()
  compile_s = time.perf_counter() - t0
  hlo = compiled.as_text()
  with open(os.path.join(outdir, "attack.optimized.hlo.txt"), "w") as f:
    f.write(hlo)
  common.block(run(variables, images, labels, key))  # warm
  with jax.profiler.trace(outdir, create_perfetto_trace=True):
    t0 = time.perf_counter()
    for _ in range(args.calls):
      common.block(run(variables, images, labels, key))
    wall = (time.perf_counter() - t0) / args.calls
  kinds = op_kinds(hlo)
  by_kind, by_op = collections.Counter(), collections.Counter()
  for name, dur in trace_events(outdir):
    base = name.split(":")[0]
    if base in kinds:
      by_kind[category(kinds[base])] += dur
      by_op[(base, kinds[base])] += dur
  total = sum(by_kind.values()) or 1.0
  result = {
      "model": args.model, "attack": args.attack, "batch": args.batch, "steps": args.steps,
      "compile_s": round(compile_s, 2), "wall_s_per_call": round(wall, 3),
      "op_time_share": {k: round(v / total, 4) for k, v in by_kind.most_common()},
      "op_seconds_per_call": round(total / 1e6 / args.calls, 3),
      "slowest_ops": [{"op": n, "kind": k, "s_per_call": round(v / 1e6 / args.calls, 4)}
                      for (n, k), v in by_op.most_common(15)],
      "trace_dir": outdir,
  }
  if args.no_record:
    print(json.dumps(result, indent=1))
  else:
    common.emit("profile_attack", result)


if __name__ == "__main__":
  main()
