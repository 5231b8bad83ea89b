"""The layering holds: the library never imports the CLIs, configs, scripts or torch,
and losses and attacks know only arrays and logits functions."""

import ast
import glob
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LIBRARY = sorted(glob.glob(os.path.join(ROOT, "prsl_jax", "**", "*.py"), recursive=True))
NEVER = ("train", "evaluate", "configs", "scripts", "bench", "tests", "torch")
# What losses and attacks may import from prsl_jax: each other, nothing else.
PURE = ("prsl_jax/losses.py", "prsl_jax/attacks/")


def _imports(path, modules=None):
  """Every module a file imports (absolute names), at any depth of the file.

  modules: when given, `from pkg import sub` of known submodules ties to them
  alone, not to pkg's __init__ as well.
  """
  out = set()
  for node in ast.walk(ast.parse(open(path).read(), path)):
    if isinstance(node, ast.Import):
      out.update(a.name for a in node.names)
    elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
      subs = {f"{node.module}.{a.name}" for a in node.names}
      known = subs & set(modules or ())
      out.update(known if modules is not None and len(known) == len(subs)
                 else subs | {node.module})
  return out


def _function_imports(path, function):
  tree = ast.parse(open(path).read(), path)
  node = next(n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == function)
  return {a.name for n in ast.walk(node) if isinstance(n, ast.Import) for a in n.names}


def test_library_never_imports_the_clis_configs_scripts_or_torch():
  assert len(LIBRARY) > 20
  bad = {os.path.relpath(p, ROOT).replace(os.sep, "/"):
         sorted(m for m in _imports(p) if m.split(".")[0] in NEVER) for p in LIBRARY}
  # The one exception: reading a pickle checkpoint needs torch, imported inside
  # the function that runs only when the user opts in (allow_pickle=True).
  convert = os.path.join(ROOT, "prsl_jax", "models", "convert.py")
  assert bad.pop("prsl_jax/models/convert.py") == ["torch"]
  assert _function_imports(convert, "_read_pickles") == {"torch"}
  assert not {p: m for p, m in bad.items() if m}


def test_losses_and_attacks_import_only_each_other_from_prsl_jax():
  for path in LIBRARY:
    rel = os.path.relpath(path, ROOT).replace(os.sep, "/")
    if not rel.startswith(PURE):
      continue
    ours = {m for m in _imports(path) if m.split(".")[0] == "prsl_jax"}
    allowed = {m for m in ours if m in ("prsl_jax", "prsl_jax.losses")
               or m.startswith("prsl_jax.attacks")}
    assert ours == allowed, (rel, sorted(ours - allowed))


def test_importing_losses_and_attacks_loads_no_model_or_transformers():
  code = ("import sys; import prsl_jax; from prsl_jax import attacks, losses; "
          "print(sorted(m for m in sys.modules if m.startswith(('prsl_jax.models', "
          "'transformers', 'torch', 'flax', 'prsl_jax.trainer', 'prsl_jax.evaluation'))))")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=120, env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert out.returncode == 0, out.stderr[-2000:]
  assert out.stdout.strip() == "[]", out.stdout
  # The lazy re-exports still work.
  code = "import prsl_jax; print(prsl_jax.load_pretrained.__module__, 'Pretrained' in dir(prsl_jax))"
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=120, env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert out.stdout.split() == ["prsl_jax.models.convert", "True"], out.stderr[-2000:]


def test_no_module_uses_another_modules_private_names():
  bad = []
  for path in LIBRARY:
    tree = ast.parse(open(path).read(), path)
    modules = set()  # local names bound to prsl_jax modules
    for node in ast.walk(tree):
      if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("prsl_jax"):
        for a in node.names:
          if a.name.startswith("_") and not a.name.startswith("__"):
            bad.append((os.path.relpath(path, ROOT), a.name))
          modules.add(a.asname or a.name)
      elif isinstance(node, ast.Import):
        modules.update(a.asname or a.name for a in node.names if a.name.startswith("prsl_jax"))
    for node in ast.walk(tree):
      if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
          and node.value.id in modules and node.attr.startswith("_")
          and not node.attr.startswith("__")):
        bad.append((os.path.relpath(path, ROOT), f"{node.value.id}.{node.attr}"))
  assert not bad, bad


def _module_of(path):
  rel = os.path.relpath(path, ROOT)[:-len(".py")].replace(os.sep, ".")
  return rel[:-len(".__init__")] if rel.endswith(".__init__") else rel


def test_no_import_circle_in_the_library_even_through_imports_inside_functions():
  # A lazy import inside a function still ties two modules both ways: the
  # layering is a tree of floors only when no chain of imports comes back.
  modules = {_module_of(p): p for p in LIBRARY}
  edges = {m: {n for n in _imports(p, modules) if n in modules and n != m}
           for m, p in modules.items()}
  state = {}  # module -> "open" while on the path, "done" after
  def visit(m, path):
    state[m] = "open"
    for n in sorted(edges[m]):
      if state.get(n) == "open":
        raise AssertionError("import circle: " + " -> ".join(path[path.index(n):] + [n]))
      if n not in state:
        visit(n, path + [n])
    state[m] = "done"
  for m in sorted(modules):
    if m not in state:
      visit(m, [m])
  assert len(edges) > 20
