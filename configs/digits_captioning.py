r"""The paper's setting, embedded: fine-tune the bundled tiny captioner with PRSL vs CE.

The tiny ViT + GPT-2 captioner (prsl_jax/assets/tiny_captioner, made by
scripts/pretrain_tiny_captioner.py) is fine-tuned on the digits' captions with the
authors' PRSL over the decoder's token logits (rows = tokens, padding ignored)
and with a cross-entropy baseline, from the same start; then every model is
evaluated under the paper's attack (BIM-10 through the model's own training
loss, label = its clean caption) and APGD-CE on the token loss, with caption
change rate, keyword survival and the diversity of generation. A few minutes on
2 CPU cores.

  python train.py --config configs/digits_captioning.py --workdir runs/digits_captioning
"""

import prsl_jax
from configs import base
from configs import common

VARIANTS = ()
FLAGS = ("runlocal",)


def get_config(arg=None):
  _, flags = common.parse_arg(arg, variants=VARIANTS, flags=FLAGS)
  c = base.base_config()
  c.workdir = "runs/digits_captioning"
  c.model.path = prsl_jax.TINY_CAPTIONER
  c.objective = "captioning"
  c.train_towers = "vision"  # the paper attacks the image: train the encoder
  c.data.caption_length = 12
  # The authors' PRSL on token rows: a batch of 32 captions of up to 12 tokens
  # is a group of ~250 rows. Window 0:4 is their default.
  c.loss.name = "prsl"
  c.loss.start, c.loss.end = 0, 4
  c.loss.weight = 1e-3
  c.compare_losses = ("ce",)
  c.batch_size = 32
  c.total_steps = 60
  c.optimizer.lr = 1e-4
  c.optimizer.warmup_steps = 5
  c.log_every = 10
  c.eval_every = 0
  c.checkpoint_every = 60
  c.eval.num_examples = 64
  c.eval.batch_size = 32
  c.eval.eps = (1 / 255, 2 / 255, 4 / 255)
  c.eval.suites = ("paper", "strong")
  c.eval.steps = 10
  if "runlocal" in flags:
    common.runlocal(c)
  return c
