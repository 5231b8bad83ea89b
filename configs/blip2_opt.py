r"""The paper's BLIP-2 recipe: BLIP-2 OPT-2.7b fine-tuned on VQA with PRSL (arXiv:2402.03627).

The authors' code (karlieswift/Mattack, blip2opt/), read for every field:
  - model: LAVIS's Blip2OPT, pretrain_opt2.7b
    (blip2opt/blip2opt/projects/blip2/train/caption_coco_vqa_ft.yaml); here
    its transformers port Salesforce/blip2-opt-2.7b (model_type blip-2).
  - trained parts: OPT frozen (blip2opt/blip2opt/models/blip2_models/
    blip2_opt.py sets requires_grad False on every OPT parameter) and
    freeze_vit: True (the yaml): the query tokens, Q-Former and projection
    train, train_towers 'qformer'.
  - schedule (the yaml): lr 1e-5, linear warm-up over 1,000 steps (from 1e-8;
    here from 0) then cosine to 0, weight decay 0.05, batch 12, 1 device.
  - loss: PRSL ("DRSL3") over the OPT token logits
    (blip2opt/attackutils/modeling_opt.py), b = 1e-6 with the windows 0:6,
    0:10 and 0:20 (blip2opt/attack_vaq.py: b = 1e-6 and the DRSL3_6_0_6,
    _0_10, _0_20 checkpoints; the yaml's output_dir is DRSL3_6_0_20), or
    cross-entropy; one group per device's batch of 12 (the whole batch).
  - data: Visual Genome QA there (vg_vqa); here any VQA set as JSON lines
    (data.name 'vqa_jsonl': <data_dir>/train.jsonl and val.jsonl, lines
    {"image", "question", "answers"}; prsl_jax.data.VqaJsonlSource): the
    training text is "Question: {question} Answer: {most frequent answer}",
    the question's tokens fed with labels ignore_index, and at most 32 tokens
    (the authors' max_txt_len).
  - evaluation: each image's own question, greedy answers of up to 10 tokens
    (the yaml's max_len; the authors generate with 5 beams), the paper's
    attack (BIM-10 through the model's own loss, label = its clean answer) and
    APGD-CE; answer change rate and VQA accuracy. (The authors' attack,
    attack_vaq.py, is BIM with step 0.3 and budget 1 in normalised pixel
    units, ~70/255 here; the budgets below are the ViT-GPT2 study's.)

The argument picks the loss: 'ce' or 'prsl_<start>_<end>' (prsl_0_6,
prsl_0_10, prsl_0_20); ',runlocal' shrinks everything for a smoke run. Needs the
checkpoint (hub or a local copy) and the JSON-lines files (README, "BLIP-2").

  python train.py --config configs/blip2_opt.py:prsl_0_20 \
      --config.data.data_dir=~/vqa_jsonl --workdir runs/blip2_opt_prsl_0_20
"""

from configs import base
from configs import common

WINDOWS = ((0, 6), (0, 10), (0, 20))
VARIANTS = tuple(f"prsl_{a}_{b}" for a, b in WINDOWS) + ("ce",)
FLAGS = ("runlocal",)
BATCH = 12
MAX_TEXT_TOKENS = 32
MAX_ANSWER_TOKENS = 10


def get_config(arg="prsl_0_20"):
  variant, flags = common.parse_arg(arg, variants=VARIANTS, flags=FLAGS)
  c = base.base_config()
  c.workdir = f"runs/blip2_opt_{variant}"
  c.model.path = "Salesforce/blip2-opt-2.7b"
  c.model.dtype = "bfloat16"  # the authors' amp; the Q-Former stays float32
  c.objective = "captioning"
  c.train_towers = "qformer"
  c.data.name = "vqa_jsonl"
  c.data.train_split = "train"
  c.data.eval_split = "val"
  c.data.caption_length = MAX_TEXT_TOKENS
  if variant == "ce":
    c.loss.name = "ce"
  else:
    c.loss.name = "prsl"
    c.loss.start, c.loss.end = (int(v) for v in variant.split("_")[1:])
    c.loss.weight = 1e-6
  c.loss.group_size = 0  # the global batch of 12: the authors' one GPU
  c.compare_losses = ()
  c.optimizer.name = "adamw"
  c.optimizer.lr = 1e-5
  c.optimizer.weight_decay = 0.05
  c.optimizer.schedule = "cosine"
  c.optimizer.warmup_steps = 1000
  c.optimizer.grad_clip = 0.0
  c.batch_size = BATCH
  c.total_steps = 10_000  # the yaml caps at 100 epochs; set this for your data
  c.log_every = 100
  c.eval_every = 0
  c.checkpoint_every = 1000
  c.eval.num_examples = 1000
  c.eval.batch_size = 12
  c.eval.eps = (1 / 255, 2 / 255, 4 / 255)
  c.eval.suites = ("paper", "strong")
  c.eval.steps = 10
  c.eval.prompt = ""  # each example's own question (the VQA source's)
  c.eval.max_length = 1 + MAX_ANSWER_TOKENS
  if "runlocal" in flags:
    common.runlocal(c)
  return c
