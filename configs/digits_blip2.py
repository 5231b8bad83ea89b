r"""The paper's BLIP-2 setting, embedded: fine-tune the bundled tiny BLIP-2 with PRSL vs CE.

The tiny BLIP-2 with OPT (prsl_jax/assets/tiny_blip2, made by
scripts/pretrain_tiny_blip2.py) is fine-tuned on the digits' captions as the
authors fine-tuned BLIP-2 (karlieswift/Mattack, blip2opt/): PRSL over the OPT
token logits of the caption's tokens (image placeholders, bos and padding are
ignored), OPT frozen and everything before it trained (train_towers 'vision':
the vision encoder, query tokens, Q-Former and projection), against a
cross-entropy baseline from the same start; then every model is evaluated
under the paper's attack (BIM-10 through the model's own training loss, label =
its clean caption) and APGD-CE on the token loss. A few minutes on 2 CPU cores.

  python train.py --config configs/digits_blip2.py --workdir runs/digits_blip2
"""

import prsl_jax
from configs import base
from configs import common

VARIANTS = ()
FLAGS = ("runlocal",)


def get_config(arg=None):
  _, flags = common.parse_arg(arg, variants=VARIANTS, flags=FLAGS)
  c = base.base_config()
  c.workdir = "runs/digits_blip2"
  c.model.path = prsl_jax.TINY_BLIP2
  c.objective = "captioning"
  c.train_towers = "vision"  # the authors': OPT frozen (blip2.TRAINABLE_PARTS['authors'])
  c.data.caption_length = 12
  # The authors' PRSL on token rows, window 0:4, as configs/digits_captioning.py.
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
