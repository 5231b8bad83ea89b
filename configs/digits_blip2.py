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
from configs import digits_captioning

VARIANTS = digits_captioning.VARIANTS
FLAGS = digits_captioning.FLAGS


def get_config(arg=None):
  # The captioner's embedded setting (loss, window, schedule, eval) on BLIP-2;
  # train_towers 'vision' is the authors' here: OPT frozen
  # (blip2.TRAINABLE_PARTS['authors']).
  c = digits_captioning.get_config(arg)
  c.workdir = "runs/digits_blip2"
  c.model.path = prsl_jax.TINY_BLIP2
  return c
