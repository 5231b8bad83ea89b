"""evaluate.py's settings and their defaults: the one table.

evaluate.py defines its flags from `DEFAULTS` and `prsl_jax.evaluator.run` fills
a settings dict's missing keys from it, so a default lives in one place. This
module imports nothing heavy: the CLI reads it while defining its flags, before
JAX or TFDS load.
"""

DEFAULTS = dict(
    checkpoint=None, dataset="digits", benchmark=None, protocol=None, split=None,
    data_dir=None, eps=None, suite=None, norm="linf", num_examples=None, seed=0,
    outdir=None, templates=None, batch_size=64, steps=None, square_queries=None,
    num_targets=None, allow_pickle=False, overwrite=False, max_length=None,
    target_caption=None, prompt=None, vision_weights=None)
# What a None above becomes when neither --protocol (prsl_jax.benchmarks.PROTOCOLS)
# nor the dataset's record (benchmarks.DATASETS: split, subset size) sets it.
# templates: 'default' for one dataset, each dataset's own ('benchmark') for several.
FALLBACKS = dict(eps="1/255,2/255,4/255", split="test", num_examples=1000)
# --suite when none is given: the task's default_suites (AutoAttack's ensemble
# for classifiers; the paper's protocol and APGD-CE on the token loss for
# captioners).
