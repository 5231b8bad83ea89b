r"""The paper's BLIP-2 setting, embedded: fine-tune the bundled tiny BLIP-2 with PRSL vs CE.

The tiny BLIP-2 with OPT (prsl_jax/assets/tiny_blip2, made by
scripts/pretrain_tiny_blip2.py) is fine-tuned on the digits' captions as the
authors fine-tuned BLIP-2 (karlieswift/Mattack, blip2opt/): PRSL over the OPT
token logits of the caption's or the answer's tokens (image placeholders, bos,
the question and padding are ignored), with OPT and the vision encoder frozen
and the query tokens, Q-Former and projection trained (train_towers 'qformer',
their VQA run: blip2opt/blip2opt/projects/blip2/train/caption_coco_vqa_ft.yaml
sets freeze_vit: True, and blip2_models/blip2_opt.py always freezes OPT), against a
cross-entropy baseline from the same start; then every model is evaluated
under the paper's attack (BIM-10 through the model's own training loss, label =
its clean answer) and APGD-CE on the token loss, on its answers to "Question:
what digit is this? Answer:" (answer change rate, VQA accuracy, diversity). A
few minutes on 2 CPU cores.

  python train.py --config configs/digits_blip2.py --workdir runs/digits_blip2
"""

import prsl_jax
from configs import digits_captioning
from prsl_jax import data

VARIANTS = digits_captioning.VARIANTS
FLAGS = digits_captioning.FLAGS


def get_config(arg=None):
  # The captioner's embedded setting (loss, window, schedule, eval) on BLIP-2.
  c = digits_captioning.get_config(arg)
  # The authors' VQA fine-tuning trains the Q-Former side only (module
  # docstring; their captioning run also trains the vision encoder: 'vision').
  c.train_towers = "qformer"
  c.workdir = "runs/digits_blip2"
  c.model.path = prsl_jax.TINY_BLIP2
  # VQA as the authors' BLIP-2 setting: captions and questions about the digit
  # ("Question: what digit is this? Answer: three", data.DIGIT_VQA), the
  # question's tokens teacher-forced and ignored by the loss; a question of
  # 16 tokens, its answer and EOS fit in 24.
  c.data.questions = True
  c.data.caption_length = 24
  # Evaluated on answers to the first question: generation starts after it;
  # answer change rate and VQA accuracy (bos + up to 3 answer tokens).
  c.eval.prompt = data.DIGIT_QUESTIONS[0]
  c.eval.max_length = 4
  return c
