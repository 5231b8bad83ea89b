"""The README's Python examples run as written."""

import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _blocks():
  with open(os.path.join(ROOT, "README.md")) as f:
    return re.findall(r"```python\n(.*?)```", f.read(), re.S)


def test_readme_has_examples():
  assert len(_blocks()) >= 2


@pytest.mark.parametrize("index", range(len(_blocks())))
def test_readme_example_runs(index, tmp_path, monkeypatch):
  code = _blocks()[index].replace("/tmp/my_clip", str(tmp_path / "my_clip"))
  monkeypatch.chdir(ROOT)
  exec(compile(code, f"README block {index}", "exec"), {"__name__": "readme"})  # pylint: disable=exec-used


@pytest.mark.parametrize("name", ["README.md", "RESULTS.md"])
def test_documents_have_no_unfilled_placeholders(name):
  with open(os.path.join(ROOT, name)) as f:
    text = f.read()
  assert "{{" not in text and "}}" not in text and "PLACEHOLDER" not in text


def test_ci_runs_the_readme_test_command():
  with open(os.path.join(ROOT, "README.md")) as f:
    command = re.search(r"^pip install -r requirements-test.txt && ([^#\n]*?python -m pytest "
                        r"[^#\n]*?)\s*#", f.read(), re.M).group(1)
  # .ci/run spells each `pip` as `python -m pip -q`; the rest verbatim.
  command = command.replace("pip install ", "python -m pip install -q ")
  with open(os.path.join(ROOT, ".ci", "run")) as f:
    assert f"requirements-test.txt && {command}\n" in f.read()
