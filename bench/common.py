"""Shared pieces of the bench/ scripts: machine description, JSON out, timing,
the ViT-B/32-shaped model and the same weights in transformers' PyTorch CLIPModel.

Every script prints ONE JSON object on stdout and appends it (one line) to
bench/results.jsonl. Benchmarks are never run as timed tests.

Run a script from the repository root after the README's install
(`pip install -r requirements.txt -e .`), e.g. `python bench/attack_throughput.py`:
Python puts bench/ first on sys.path, so the scripts import this module as
`common`, and prsl_jax comes from the install.
"""

import datetime
import functools
import json
import os
import platform
import subprocess
import time

from prsl_jax import compilation

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The XLA:CPU settings train.py and evaluate.py use (prsl_jax/compilation.py),
# set before JAX starts its backend, so the benchmarks measure what users run.
# bench/xla_settings.py sets $PRSL_JAX_BENCH_RAW_FLAGS to time other settings.
if not os.environ.get("PRSL_JAX_BENCH_RAW_FLAGS"):
  compilation.set_cpu_flags()

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax.numpy as jnp  # pylint: disable=wrong-import-position
import numpy as np  # pylint: disable=wrong-import-position

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results.jsonl")

# CLIP ViT-B/32's vision tower (openai/clip-vit-base-patch32). The text tower is
# never run by the benchmarks (class embeddings are random unit vectors), so it
# is kept tiny to save init time and memory; it does not change any timing.
VITB32_VISION = dict(image_size=224, patch_size=32, hidden_size=768, intermediate_size=3072,
                     num_hidden_layers=12, num_attention_heads=12, hidden_act="quick_gelu")
# --quick: same architecture family, ~1000x fewer FLOPs, for smoke tests.
QUICK_VISION = dict(image_size=64, patch_size=16, hidden_size=128, intermediate_size=512,
                    num_hidden_layers=2, num_attention_heads=4, hidden_act="quick_gelu")
TINY_TEXT = dict(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                 num_attention_heads=2, max_position_embeddings=16,
                 bos_token_id=998, eos_token_id=999, pad_token_id=1)


def num_cores():
  """CPU cores this process may run on (the affinity mask, not the host's count)."""
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:
    return os.cpu_count()


def _cpu_model():
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def _cpu_flags():
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("flags"):
          flags = set(line.split(":", 1)[1].split())
          return sorted(f for f in flags if f.startswith(("avx", "fma", "amx")))
  except OSError:
    pass
  return []


def total_memory_bytes():
  """Physical memory (psutil is not a requirement of the project: /proc first)."""
  try:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
  except (ValueError, OSError, AttributeError):
    import psutil  # pylint: disable=g-import-not-at-top
    return psutil.virtual_memory().total


def rss_bytes():
  """This process's resident set size now (Linux /proc; psutil elsewhere)."""
  try:
    with open("/proc/self/statm") as f:
      return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
  except OSError:
    import psutil  # pylint: disable=g-import-not-at-top
    return psutil.Process().memory_info().rss


def _git_commit():
  try:
    return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                          text=True, timeout=10).stdout.strip() or None
  except (OSError, subprocess.SubprocessError):
    return None


def _version(name):
  try:
    mod = __import__(name)
    return getattr(mod, "__version__", "?")
  except ImportError:
    return None


def machine():
  """What the figures were measured on. loadavg is taken now: on a shared machine
  a load above the core count means the timings are slowed by other processes."""
  dev = jax.devices()[0]
  return {
      "cpu_model": _cpu_model(),
      "cpu_flags": _cpu_flags(),
      "cores": num_cores(),
      "mem_gib": round(total_memory_bytes() / 2**30, 1),
      "jax_backend": jax.default_backend(),
      "device": getattr(dev, "device_kind", str(dev)),
      "num_devices": jax.device_count(),
      "python": platform.python_version(),
      "jax": jax.__version__,
      "jaxlib": _version("jaxlib"),
      "flax": _version("flax"),
      "torch": _version("torch"),
      "transformers": _version("transformers"),
      "loadavg": [round(x, 2) for x in os.getloadavg()],
      "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "git_commit": _git_commit(),
  }


def emit(name, result, path=RESULTS):
  """Prints {bench, ...result, machine} as one JSON line and appends it to path."""
  out = {"bench": name, **result, "machine": machine()}
  line = json.dumps(out, default=_json_default)
  print(line, flush=True)
  with open(path, "a") as f:
    f.write(line + "\n")
  return out


def _json_default(x):
  if isinstance(x, (np.generic,)):
    return x.item()
  if isinstance(x, np.ndarray):
    return x.tolist()
  return str(x)


def wait_for_quiet(max_load=1.0, timeout_s=240):
  """Sleeps until the 1-minute load average is below max_load (at most timeout_s).

  Returns the load average then: a timed run starts on a settled machine, and
  the figure is recorded beside it.
  """
  t0 = time.time()
  while os.getloadavg()[0] >= max_load and time.time() - t0 < timeout_s:
    time.sleep(5)
  return os.getloadavg()[0]


# Ratios are reported only when the 1-minute load average was below this before
# every timed call: with other jobs on the machine torch's OpenMP threads stall
# at every barrier and a ratio measures the load, not the frameworks.
QUIET_LOAD = 1.0


def gate_on_load(ratios, loads, max_load=QUIET_LOAD):
  """(ratios or None, note): ratios withheld when any load in `loads` was >= max_load."""
  worst = max(loads) if loads else float("nan")
  if not loads or worst >= max_load:
    return None, (f"ratios not reported: the load average before a timed call was up to "
                  f"{worst:.2f} (>= {max_load}); rerun on a quiet machine. Under load: "
                  f"{ratios}")
  return ratios, f"load average before the timed calls at most {worst:.2f} (< {max_load})"


def block(x):
  """Waits for every array in the pytree x (jax or torch) to be computed."""
  return jax.block_until_ready(x)


def time_calls(fn, *, warmup=1, repeats=3):
  """Seconds per call of fn() (each call's result blocked on), after warmup calls.

  Returns a dict with the per-call times, their median and min. The min is the
  least disturbed by other processes on a shared machine; the median is the
  typical figure.
  """
  for _ in range(warmup):
    block(fn())
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    block(fn())
    times.append(time.perf_counter() - t0)
  return summary(times)


def summary(times):
  times = [float(t) for t in times]
  return {"times_s": [round(t, 4) for t in times], "median_s": float(np.median(times)),
          "min_s": float(np.min(times))}


def interleaved(fns, *, warmup=1, repeats=3):
  """Times several callables round-robin, so that each sees the same share of a
  fluctuating machine load. fns: {name: fn}. Returns {name: summary}."""
  for fn in fns.values():
    for _ in range(warmup):
      block(fn())
  times = {k: [] for k in fns}
  for _ in range(repeats):
    for k, fn in fns.items():
      t0 = time.perf_counter()
      block(fn())
      times[k].append(time.perf_counter() - t0)
  return {k: summary(v) for k, v in times.items()}


def matmul_peak(n=2048, repeats=8, dtype=jnp.float32):
  """Measured FLOP/s of a jitted (n, n) @ (n, n) on the default device.

  The best of `repeats` calls, so the figure is the machine's matmul peak as
  XLA reaches it (and not a theoretical vendor number).
  """
  a = jax.random.normal(jax.random.key(0), (n, n), dtype)
  b = jax.random.normal(jax.random.key(1), (n, n), dtype)
  f = jax.jit(jnp.dot)
  t = time_calls(lambda: f(a, b), warmup=2, repeats=repeats)
  flops = 2.0 * n ** 3
  return {"n": n, "dtype": jnp.dtype(dtype).name, "flops": flops,
          "best_flops_per_s": flops / t["min_s"], "median_flops_per_s": flops / t["median_s"],
          **t}


def torch_matmul_peak(n=2048, repeats=5):
  """Same measurement with torch.mm (float32), for reference."""
  import torch  # pylint: disable=g-import-not-at-top
  g = torch.Generator().manual_seed(0)
  a = torch.randn(n, n, generator=g)
  b = torch.randn(n, n, generator=g)
  t = time_calls(lambda: torch.mm(a, b), warmup=2, repeats=repeats)
  flops = 2.0 * n ** 3
  return {"n": n, "best_flops_per_s": flops / t["min_s"], **t}


def hf_config(quick=False):
  """transformers.CLIPConfig: ViT-B/32's vision tower (or the --quick one), tiny text."""
  import transformers  # pylint: disable=g-import-not-at-top
  vision = QUICK_VISION if quick else VITB32_VISION
  return transformers.CLIPConfig(vision_config=dict(vision), text_config=dict(TINY_TEXT),
                                 projection_dim=512)


@functools.lru_cache(maxsize=None)
def _clip_cached(quick, dtype_name, remat, seed):
  from prsl_jax.models import convert  # pylint: disable=g-import-not-at-top
  return convert.from_config(hf_config(quick), key=jax.random.key(seed),
                             dtype=jnp.dtype(dtype_name), remat=remat)


def make_clip(quick=False, dtype=jnp.float32, remat=False, seed=0):
  """Random-weight CLIP of the benchmark shape: prsl_jax.Pretrained(model, params, None).

  Cached per setting. model is the static part (prsl_jax.models.clip.CLIP), params
  a float32 pytree passed to every function as an argument.
  """
  return _clip_cached(bool(quick), jnp.dtype(dtype).name, bool(remat), seed)


def with_dtype(pretrained, dtype, remat=False):
  """The same params on a model with another compute dtype / remat setting."""
  import dataclasses  # pylint: disable=g-import-not-at-top
  import prsl_jax  # pylint: disable=g-import-not-at-top
  from prsl_jax.models import clip as clip_lib  # pylint: disable=g-import-not-at-top
  model = clip_lib.CLIP(dataclasses.replace(pretrained.model.config, dtype=jnp.dtype(dtype),
                                            remat=remat))
  return prsl_jax.Pretrained(model, pretrained.params, pretrained.tokenizer)


def classifier(pretrained, class_emb):
  """(zeroshot.Classifier(model), variables): the zero-shot model under attack.

  The classifier is a value-hashable fn(variables, images (B, S, S, 3) in [0, 1])
  -> (B, C) logits; variables = {"params", "class_emb"} is a jit argument, so
  the params are never baked into a compiled program as constants.
  """
  from prsl_jax import zeroshot  # pylint: disable=g-import-not-at-top
  return (zeroshot.Classifier(pretrained.model),
          {"params": pretrained.params, "class_emb": class_emb})


def class_embeddings(num_classes, dim=512, seed=1):
  """(C, D) random unit vectors: stand-ins for text class embeddings."""
  e = jax.random.normal(jax.random.key(seed), (num_classes, dim), jnp.float32)
  return e / jnp.linalg.norm(e, axis=-1, keepdims=True)


def images_and_labels(batch, size, num_classes, seed=2):
  """(B, S, S, 3) float32 uniform in [0, 1] and (B,) int32 labels, as numpy."""
  rng = np.random.default_rng(seed)
  x = rng.random((batch, size, size, 3), dtype=np.float32)
  y = rng.integers(0, num_classes, size=(batch,)).astype(np.int32)
  return x, y


def set_torch_threads(n=None):
  """torch intra-op threads = the cores JAX's CPU client uses (all of them)."""
  import torch  # pylint: disable=g-import-not-at-top
  n = n or num_cores()
  torch.set_num_threads(n)
  return n


def torch_clip(pretrained, quick=False):
  """transformers' PyTorch CLIPModel holding exactly the params of `pretrained`, eval mode."""
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  from prsl_jax.models import convert  # pylint: disable=g-import-not-at-top
  model = transformers.CLIPModel(hf_config(quick))
  state = {k: torch.from_numpy(v) for k, v in
           convert.to_hf_state_dict(pretrained.params, pretrained.model).items()}
  missing, unexpected = model.load_state_dict(state, strict=False)
  # Buffers such as position_ids are not params; any real weight left out is a bug.
  real_missing = [k for k in missing if not k.endswith("position_ids")]
  if real_missing or unexpected:
    raise RuntimeError(f"weight transfer to torch failed: missing {real_missing[:5]}, "
                       f"unexpected {list(unexpected)[:5]}")
  model.eval()
  for p in model.parameters():
    p.requires_grad_(False)
  return model


class TorchZeroShot:
  """PyTorch mirror of prsl_jax.zeroshot.logits on the vision tower.

  __call__(x): x (B, 3, S, S) float32 in [0, 1] -> (B, C) logits =
  scale * cos(visual_projection(vision_model(normalise(x)).pooler_output), class_emb).
  """

  def __init__(self, model, class_emb, mean, std):
    import torch  # pylint: disable=g-import-not-at-top
    self.model = model
    self.class_emb = torch.from_numpy(np.array(class_emb, np.float32))
    self.class_emb = self.class_emb / self.class_emb.norm(dim=-1, keepdim=True)
    self.mean = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    self.std = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    self.scale = model.logit_scale.detach().exp()

  def __call__(self, x):
    pixels = (x - self.mean) / self.std
    pooled = self.model.vision_model(pixel_values=pixels).pooler_output
    img = self.model.visual_projection(pooled)
    img = img / img.norm(dim=-1, keepdim=True)
    return self.scale * img @ self.class_emb.T


def nchw(x):
  """numpy NHWC -> torch NCHW float32 tensor (a copy, contiguous)."""
  import torch  # pylint: disable=g-import-not-at-top
  return torch.from_numpy(np.ascontiguousarray(np.asarray(x).transpose(0, 3, 1, 2)))


def torch_pgd(logits_fn, x0, labels, *, eps, steps, step_size=None, generator=None,
              random_start=True):
  """L-inf PGD in PyTorch with prsl_jax.attacks.pgd's semantics (CE objective).

  Uniform random start (or the clean image), `steps` signed-gradient steps with projection onto the
  eps-ball and [0, 1], the per-example best iterate (misclassified first, then the
  highest loss) over every scored point, and a last forward pass to score the
  final point: the same work as ours, step for step.
  """
  import torch  # pylint: disable=g-import-not-at-top
  import torch.nn.functional as F  # pylint: disable=g-import-not-at-top
  step_size = 2.5 * eps / steps if step_size is None else step_size
  b = x0.shape[0]
  if random_start:
    u = torch.rand(x0.shape, generator=generator) * 2 - 1
    x = torch.clamp(torch.clamp(x0 + eps * u, x0 - eps, x0 + eps), 0, 1)
  else:
    x = x0.clone()
  best_x = x0.clone()
  best_s = torch.zeros(b, dtype=torch.int32)
  best_o = torch.full((b,), -float("inf"))

  def merge(x, logits, obj):
    nonlocal best_x, best_s, best_o
    s = (logits.argmax(-1) != labels).to(torch.int32)
    better = (s > best_s) | ((s == best_s) & (obj > best_o))
    best_x = torch.where(better.view(-1, 1, 1, 1), x, best_x)
    best_s = torch.where(better, s, best_s)
    best_o = torch.where(better, obj, best_o)

  for _ in range(steps):
    x = x.detach().requires_grad_(True)
    logits = logits_fn(x)
    obj = F.cross_entropy(logits, labels, reduction="none")
    grad, = torch.autograd.grad(obj.sum(), x)
    with torch.no_grad():
      merge(x.detach(), logits, obj)
      x = x + step_size * grad.sign()
      x = torch.clamp(torch.min(torch.max(x, x0 - eps), x0 + eps), 0, 1)
  with torch.no_grad():
    logits = logits_fn(x)
    merge(x, logits, F.cross_entropy(logits, labels, reduction="none"))
  return best_x


def vit_flops_per_image(vision, projection_dim=512, num_classes=0):
  """Analytic forward FLOPs (2 per multiply-add) of the vision tower + head, per image.

  Counts the matmuls only (patch embedding, q/k/v/out, attention scores and
  values, MLP, projection, class logits); layer norms and activations are a few
  percent more and are left out, as is usual for MFU.
  """
  s, p, d, f = vision["image_size"], vision["patch_size"], vision["hidden_size"], vision["intermediate_size"]
  layers = vision["num_hidden_layers"]
  n = (s // p) ** 2
  t = n + 1
  patch = 2 * n * (p * p * 3) * d
  per_layer = 2 * t * d * (4 * d) + 2 * 2 * t * t * d + 2 * t * d * f * 2
  head = 2 * d * projection_dim + 2 * projection_dim * num_classes
  return patch + layers * per_layer + head


def attack_flops_per_image(vision, steps, num_classes):
  """Analytic PGD FLOPs per image: `steps` forward+backward passes plus one last
  forward (the final point is scored without a gradient).

  The attack differentiates w.r.t. the input only (the params are constants), so
  the backward of each matmul is one matmul (the input gradient; the weight
  gradient is dead code and XLA drops it) and one attack step costs ~2x the
  forward, not the ~3x of a training step.
  """
  fwd = vit_flops_per_image(vision, num_classes=num_classes)
  return steps * 2 * fwd + fwd
