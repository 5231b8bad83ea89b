"""Small library behaviours: log lines off a terminal, per-attack settings, budget warnings."""

import io
import warnings

import pytest

from prsl_jax import compilation
from prsl_jax import evaluation
from prsl_jax import evaluator
from prsl_jax import progress


def test_progress_off_a_terminal_is_one_line_per_stage():
  out = io.StringIO()  # not a tty: a batch job's log
  bar = progress.bar(3, "eps=1/255 apgd-ce", file=out)
  for _ in range(3):
    bar.update()
  bar.set_postfix(robust_acc="0.500")
  bar.reset(total=2, desc="eps=1/255 apgd-t target 1")
  bar.update(2)
  bar.close()
  text = out.getvalue()
  assert "\r" not in text
  lines = text.splitlines()
  assert len(lines) == 2, lines
  assert lines[0].startswith("eps=1/255 apgd-ce: 3/3 in ") and lines[0].endswith(
      "robust_acc=0.500")
  assert lines[1].startswith("eps=1/255 apgd-t target 1: 2/2 in ")


def test_progress_disabled_prints_nothing():
  out = io.StringIO()
  bar = progress.bar(3, "stage", enabled=False, file=out)
  bar.update()
  bar.close()
  assert out.getvalue() == ""


def test_make_suite_applies_per_attack_settings_last():
  suite = evaluation.make_suite("standard", steps=10, queries=100, num_targets=9,
                                settings={"apgd-t": {"num_targets": 3, "steps": 20},
                                          "square": {"queries": 50}})
  by_name = {a.name: a for a in suite}
  assert [a.name for a in suite] == ["apgd-ce", "apgd-t", "fab-t", "square"]
  assert (by_name["apgd-t"].num_targets, by_name["apgd-t"].steps) == (3, 20)
  assert (by_name["fab-t"].num_targets, by_name["fab-t"].steps) == (9, 10)
  assert by_name["square"].queries == 50 and by_name["apgd-ce"].steps == 10
  with pytest.raises(ValueError, match=r"settings for \['pgd-ce'\]"):
    evaluation.make_suite("fast", settings={"pgd-ce": {"steps": 3}})
  with pytest.raises(ValueError, match=r"unknown setting\(s\) \['stepz'\]"):
    evaluation.make_suite("fast", settings={"apgd-ce": {"stepz": 3}})
  with pytest.raises(ValueError, match="apgd-t num_targets"):
    evaluation.make_suite("fast", settings={"apgd-t": {"num_targets": 0}})


def test_budgets_far_above_the_fields_range_warn_and_impossible_ones_fail():
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    assert evaluator.parse_eps("1/255,4/255,16/255") == [1 / 255, 4 / 255, 16 / 255]
  with pytest.warns(UserWarning, match=r"--eps 32/255 is far above"):
    assert evaluator.parse_eps("32/255") == [32 / 255]
  with pytest.warns(UserWarning, match=r"--eps 8 is far above"):
    evaluator.parse_eps("8", norm="l2")
  with pytest.raises(ValueError, match="exceeds 1"):
    evaluator.parse_eps("4")
  with pytest.raises(ValueError, match=">= 0"):
    evaluator.parse_eps("-1/255")


def test_trainer_warns_on_budgets_far_above_the_fields_range():
  from configs import default  # pylint: disable=g-import-not-at-top
  from prsl_jax import trainer  # pylint: disable=g-import-not-at-top
  c = default.get_config()
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    trainer.validate(c, num_classes=10)
  c.eval.eps = (2 / 255, 64 / 255)
  with pytest.warns(UserWarning, match=r"config.eval.eps=64/255 is far above"):
    trainer.validate(c, num_classes=10)
  c.eval.eps = (2 / 255,)
  c.adversarial.enabled, c.adversarial.eps = True, 0.5
  with pytest.warns(UserWarning, match=r"config.adversarial.eps=.* is far above"):
    trainer.validate(c, num_classes=10)


def test_cpu_devices_divide_the_batch_and_keep_rows_per_device():
  assert compilation.auto_cpu_devices(64, cores=2) == 2
  assert compilation.auto_cpu_devices(64, cores=8) == 8
  assert compilation.auto_cpu_devices(60, cores=8) == 6      # the largest divisor <= cores
  assert compilation.auto_cpu_devices(5, cores=2) == 1       # odd batch: one device
  assert compilation.auto_cpu_devices(12, cores=16) == 3     # >= 4 rows per device
  assert compilation.auto_cpu_devices(4, cores=2) == 1
  assert compilation.auto_cpu_devices(0, cores=2) == 1       # the preflight names a bad size
