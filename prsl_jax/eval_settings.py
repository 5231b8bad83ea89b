"""evaluate.py's settings and their defaults: the one table.

evaluate.py defines its flags from `DEFAULTS` and `prsl_jax.evaluator.run` fills
a settings dict's missing keys from it, so a default lives in one place. This
module imports nothing heavy: the CLI reads it while defining its flags, before
JAX or TFDS load.
"""

DEFAULTS = dict(
    checkpoint=None, dataset="digits", split="test", data_dir=None,
    eps="1/255,2/255,4/255", suite=None, norm="linf", num_examples=1000, seed=0,
    outdir=None, templates="default", batch_size=64, steps=None, square_queries=None,
    num_targets=None, allow_pickle=False, overwrite=False, max_length=None,
    target_caption=None, vision_weights=None)
# --suite when none is given: the task's default_suites (AutoAttack's ensemble
# for classifiers; the paper's protocol and APGD-CE on the token loss for
# captioners).
