"""The rows of the PRSL study (issue 7), shared by the digits run and the full-scale configs.

A row is what gets fine-tuned: the loss and its k / weight / renormalisation, and
whether the training images are adversarial (TeCoA-style PGD at every step). The
protocol (model, data, budgets, schedule) belongs to the config that applies a row:
scripts/prsl_study.py (tiny CLIP on the digits), configs/study_tecoa_b32.py and
configs/study_fare_l14.py.

Why these weights. The raw R_K is the variance of K wrong-class probabilities, so
it scales with their square: on confident clean predictions it is tiny (~3e-9 for
the tiny CLIP on its training digits, gradient ~1e-4 of the cross-entropy's), and
weight 10 or 100 leaves PRSL equal to CE in all but name. 1e4 makes the two
gradients comparable at the start of fine-tuning, 1e5 makes R_K dominate. On
adversarial images R_K is large (~0.07 at PGD-2, 2/255; gradient ~1/30 of CE's), so
adversarial PRSL uses 100. The renormalised R_K is scale-free (at most (K-1)/K^2)
and its gradient exceeds CE's already at weight 1. Larger models are less
confident, so R_K is larger there: measure it on your model
(scripts/prsl_study.py's loss_scales) before trusting these weights at full scale.
"""

W_COMPARABLE, W_DOMINANT, W_ADV = 1e4, 1e5, 100.0

# name -> (loss, k, weight, renormalize, adversarial)
ROWS = {
    "ce": ("ce", 3, 0.0, False, False),
    # R_1 is the variance of one number, 0: PRSL with k=1 is CE whatever the weight.
    "prsl_k1": ("prsl", 1, W_COMPARABLE, False, False),
    "prsl_k3_w1e4": ("prsl", 3, W_COMPARABLE, False, False),
    "prsl_k5_w1e4": ("prsl", 5, W_COMPARABLE, False, False),
    "prsl_k9_w1e4": ("prsl", 9, W_COMPARABLE, False, False),
    "prsl_k3_w1e5": ("prsl", 3, W_DOMINANT, False, False),
    "prsl_k5_w1e5": ("prsl", 5, W_DOMINANT, False, False),
    "prsl_k9_w1e5": ("prsl", 9, W_DOMINANT, False, False),
    "prsl_renorm_k3_w10": ("prsl", 3, 10.0, True, False),
    "topk_ce_k3": ("topk_ce", 3, 0.0, False, False),
    "adv_ce": ("ce", 3, 0.0, False, True),
    "adv_prsl": ("prsl", 3, W_ADV, False, True),
}


def apply_row(config, name):
  """Sets config.loss and config.adversarial.enabled for row `name`; returns config."""
  if name not in ROWS:
    raise ValueError(f"unknown study row {name!r}; choose one of {list(ROWS)}")
  loss, k, weight, renormalize, adversarial = ROWS[name]
  config.loss.name = loss
  config.loss.k = k
  config.loss.weight = weight
  config.loss.renormalize = renormalize
  config.compare_losses = ()
  config.adversarial.enabled = adversarial
  return config
