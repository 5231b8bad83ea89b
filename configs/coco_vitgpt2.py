r"""The paper's ViT-GPT2 recipe on COCO captions (arXiv:2402.03627; karlieswift/Mattack).

The authors' vitgpt2/ddp_train_coco.py: a VisionEncoderDecoderModel (ViT-B/16 +
GPT-2) trained on COCO train2017 captions for 2 epochs, AdamW (torch defaults:
weight decay 0.01), constant lr 5e-5, a batch of 8 captions of 128 tokens per GPU
under DDP, whole model trained, PRSL ("DRSL3") with b = 1e-5 and the windows
0:4, 0:6, 0:10, 0:20, 0:100, 4:13, 6:10, 6:15, 11:20, or cross-entropy. Their
loss ran per GPU, so each group is one GPU's 8 captions: group_size = 8 x 128
token rows. (They padded captions with EOS and did not mask the padding; here
padding is ignore_index, so the loss sees each caption and its one EOS.)

The argument picks the loss: 'ce' or 'prsl_<start>_<end>' (e.g. prsl_0_4);
',runlocal' shrinks everything for a smoke run. Needs the checkpoint (hub or a
local copy) and TFDS coco_captions prepared (see README, "Data").

  python train.py --config configs/coco_vitgpt2.py:prsl_0_4 \
      --config.data.data_dir=~/tensorflow_datasets --workdir runs/coco_prsl_0_4
"""

from configs import base
from configs import common

WINDOWS = ((0, 4), (0, 6), (0, 10), (0, 20), (0, 100), (4, 13), (6, 10), (6, 15), (11, 20))
VARIANTS = tuple(f"prsl_{a}_{b}" for a, b in WINDOWS) + ("ce",)
FLAGS = ("runlocal",)
COCO_TRAIN_IMAGES = 118_287  # train2017
CAPTION_TOKENS = 128
PER_GPU = 8
GPUS = 4  # the authors' torchrun --nproc_per_node=4


def get_config(arg="prsl_0_4"):
  variant, flags = common.parse_arg(arg, variants=VARIANTS, flags=FLAGS)
  c = base.base_config()
  c.workdir = f"runs/coco_vitgpt2_{variant}"
  c.model.path = "nlpconnect/vit-gpt2-image-captioning"
  c.objective = "captioning"
  c.train_towers = "both"
  c.data.name = "coco_captions"
  c.data.train_split = "train"
  c.data.eval_split = "val"
  c.data.caption_length = CAPTION_TOKENS
  if variant == "ce":
    c.loss.name = "ce"
  else:
    c.loss.name = "prsl"
    c.loss.start, c.loss.end = (int(v) for v in variant.split("_")[1:])
    c.loss.weight = 1e-5
  c.loss.group_size = PER_GPU * CAPTION_TOKENS
  c.compare_losses = ()
  c.optimizer.name = "adamw"
  c.optimizer.lr = 5e-5
  c.optimizer.weight_decay = 0.01
  c.optimizer.schedule = "constant"
  c.optimizer.warmup_steps = 0
  c.optimizer.grad_clip = 0.0
  c.batch_size = PER_GPU * GPUS
  c.total_steps = 2 * COCO_TRAIN_IMAGES // c.batch_size
  c.log_every = 100
  c.eval_every = 0
  c.checkpoint_every = 1000
  c.eval.num_examples = 1000
  c.eval.batch_size = 32
  c.eval.eps = (1 / 255, 2 / 255, 4 / 255)
  c.eval.suites = ("paper", "strong")
  c.eval.steps = 10
  if "runlocal" in flags:
    common.runlocal(c)
  return c
