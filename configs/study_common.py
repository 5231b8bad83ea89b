"""The rows of the PRSL study, shared by the digits run and the full-scale configs.

A row is what gets fine-tuned: the loss with its arguments, and whether the
training images are adversarial (TeCoA-style PGD at every step). Beside PRSL
and its ablations, the field's adversarial fine-tuning methods, all at the same
budget (the protocol's PGD steps and eps, e.g. PGD-2 at 2/255 in the digits
study, with the same step count and batch):

    adv_ce    TeCoA (adversarial CE; Mao et al., ICLR 2023)
    fare      FARE (Schlarmann et al., ICML 2024): the unsupervised embedding
              loss to the frozen original, its attack maximising that loss
    pmg_aft   PMG-AFT (Wang et al., CVPR 2024): CE on the adversarial image plus
              KL to the original's and to the clean prediction (weights 1, 1)

(prsl_jax/finetune_losses.py has FARE's and PMG-AFT's formulas and the authors'
code they follow.) The protocol
(model, data, budgets, schedule) belongs to whoever applies a row:
scripts/prsl_study.py (tiny CLIP on the digits), configs/study_tecoa_b32.py and
configs/study_fare_l14.py.

The loss is the authors' PRSL (arXiv:2402.03627; code: GitHub karlieswift/Mattack,
lossfunctions.py class PRSL, trained as "DRSL3" in
vitgpt2/attackutils/modeling_vision_encoder_decoder.py):

    PRSL = a * CE + b * x,  x = n logsumexp_i(m_i) - sum_i m_i >= n log n

over the n rows of a group, m_i the mean of row i's wrong-class logits ranked
start..end-1 (prsl_jax.losses.prsl_loss). The study's group is the global batch
(group_size 0), except one row with groups of 8.

Why these weights. Adam is invariant to the loss's overall scale, so what b does
is set by the ratio r = ||grad CE|| / ||grad x|| (the b at which the two terms
pull equally hard): b / r is the PRSL term's share. scripts/prsl_study.py
measures r at the starting tiny CLIP on its first 20 training batches of 32
(results/study.json -> gradient_ratios). Medians, w.r.t. the logits (w.r.t. the
vision parameters in brackets):

    clean images      PRSL 0:4  4.5e-5 (3.4e-5)   0:6  5.4e-5 (3.9e-5)
                           0:9  7.3e-5 (6.3e-5)   4:9  2.7e-5 (2.0e-5)
                      0:4 in groups of 8  1.9e-4 (1.5e-4)
                      DRSL  5.2e-7 (3.5e-7)   ours: top-3 variance  2.4e4 (1.3e4)
    PGD-2 images      PRSL 0:4  0.040 (0.083)
    (2/255)

The tiny CLIP is very confident on its training digits (CE ~2.5e-4), so CE's
gradient is tiny and r is small. Hence the grid b = 1e-6 .. 1e-2 for the window
0:4 (share ~0.02 to ~200: from no measurable effect to PRSL dominating) and
1e-5 .. 1e-3 for the windows 0:6, 0:9 (= every wrong class of the digits) and
4:9 (share ~0.2 to ~40); 1e-5 is the authors' ViT-GPT2 value
(vitgpt2/ddp_train_coco.py). Groups of 8 and DRSL at the informative shares; ours
(the old misreading) as one ablation row at a share of ~4; adversarial PRSL at
b = 0.1, a share of ~2.5 on the PGD-2 images it trains on.

The shares do not transfer: r depends on how confident the model is and on the
group's row count n (x sums over rows). At full scale measure r on your model
first (scripts/prsl_study.py's gradient_ratios) and override --config.loss.weight.
"""

# Window (start, end) -> the weights b of its rows.
PRSL_GRID = {
    (0, 4): (1e-6, 1e-5, 1e-4, 1e-3, 1e-2),
    (0, 6): (1e-5, 1e-4, 1e-3),
    (0, 9): (1e-5, 1e-4, 1e-3),
    (4, 9): (1e-5, 1e-4, 1e-3),
}
AUTHORS_WEIGHT = 1e-5  # ViT-GPT2 (vitgpt2/ddp_train_coco.py, b = 0.00001)
GROUP_ROW = ((0, 4), 1e-3, 8)  # window, b, group_size: against the global batch
DRSL_WEIGHTS = (1e-6, 1e-5)
OURS = dict(k=3, weight=1e5, renormalize=False)
ADV_PRSL = ((0, 4), 1e-1)


def fmt_weight(b):
  """1e-05 -> '1e-5', 0.1 -> '1e-1', 100000.0 -> '1e5' (row names, labels)."""
  mantissa, exponent = f"{b:.0e}".split("e")
  return f"{mantissa}e{int(exponent)}"


def _prsl(window, b, group_size=0):
  return dict(name="prsl", start=window[0], end=window[1], weight=b, ce_weight=1.0,
              group_size=group_size)


def _rows():
  rows = {"ce": dict(label="CE", family="ce", loss=dict(name="ce"), adversarial=False)}
  for window, weights in PRSL_GRID.items():
    for b in weights:
      rows[f"prsl_{window[0]}_{window[1]}_b{fmt_weight(b)}"] = dict(
          label=f"PRSL {window[0]}:{window[1]} b={fmt_weight(b)}", family="prsl",
          loss=_prsl(window, b), adversarial=False)
  window, b, group = GROUP_ROW
  rows[f"prsl_{window[0]}_{window[1]}_b{fmt_weight(b)}_g{group}"] = dict(
      label=f"PRSL {window[0]}:{window[1]} b={fmt_weight(b)}, groups of {group}",
      family="prsl_group", loss=_prsl(window, b, group), adversarial=False)
  for b in DRSL_WEIGHTS:
    rows[f"drsl_b{fmt_weight(b)}"] = dict(
        label=f"DRSL b={fmt_weight(b)}", family="drsl",
        loss=dict(name="drsl", weight=b, ce_weight=1.0), adversarial=False)
  rows[f"ours_var_k{OURS['k']}_w{fmt_weight(OURS['weight'])}"] = dict(
      label=f"ours (ablation): top-{OURS['k']} probability variance, "
            f"w={fmt_weight(OURS['weight'])}",
      family="ours", loss=dict(name="topk_variance", **OURS), adversarial=False)
  rows["adv_ce"] = dict(label="TeCoA (adversarial CE, PGD-2 at 2/255)", family="adv",
                        loss=dict(name="ce"), adversarial=True)
  rows["fare"] = dict(label="FARE (embedding loss to the original, PGD-2 at 2/255)",
                      family="adv", loss=dict(name="fare"), adversarial=True)
  rows["pmg_aft"] = dict(label="PMG-AFT (CE + KL to original and clean, PGD-2 at 2/255)",
                         family="adv", loss=dict(name="pmg_aft"), adversarial=True)
  window, b = ADV_PRSL
  rows[f"adv_prsl_{window[0]}_{window[1]}_b{fmt_weight(b)}"] = dict(
      label=f"adversarial PRSL {window[0]}:{window[1]} b={fmt_weight(b)} (PGD-2 at 2/255)",
      family="adv", loss=_prsl(window, b), adversarial=True)
  return rows


# name -> {label, family, loss: {name, and that loss's arguments}, adversarial}
ROWS = _rows()


def apply_row(config, name):
  """Sets config.loss (name and the row's arguments) and config.adversarial.enabled.

  Fields the row's loss does not take keep their configs/base.py values. Returns config.
  """
  if name not in ROWS:
    raise ValueError(f"unknown study row {name!r}; choose one of {list(ROWS)}")
  row = ROWS[name]
  for field, value in row["loss"].items():
    config.loss[field] = value
  config.compare_losses = ()
  config.adversarial.enabled = row["adversarial"]
  return config
