"""Models: CLIP (clip), SigLIP (siglip), the ViT-GPT-2 captioner (captioner) and its
decoding (generation), BLIP-2 with OPT (blip2, its decoding blip2_generation);
checkpoint conversion (convert: HF folders; open_clip: open_clip folders;
vision_weights: a vision tower put on a base CLIP); tokenizers (bpe_tokenizer:
CLIP's BPE offline, for open_clip folders; tokenizer: tiny offline builders); and
the layer helpers they share (layers). No module uses another's private names.

The model protocol. A model family is one module here whose static model class
(a frozen dataclass of its config: hashable, equal by value, a jit static
argument, holding no arrays; params are always an argument) provides:

  kind          config.json's model_type (a key of convert.MODEL_KINDS)
  task          the task evaluate.py measures it with (a key of prsl_jax.tasks.TASKS)
  towers        {"vision", "text", "both"} -> top-level param keys
                (config.train_towers; the optimizer masks by them)
  image_size    input resolution S: images are (B, S, S, 3) float32 in [0, 1]
                and pixel normalisation happens inside the model
  init(key), param_shapes()
  and the methods of the tasks it fits (tasks.Task.needs):
    CLIP-like   encode_images(params, images) -> (B, D),
                encode_texts(params, ids, mask) -> (B, D), logit_scale(params),
                max_text_length; optionally logit_bias(params) (SigLIP): then
                logits are scale * cos + bias and the contrastive task trains
                with the sigmoid loss (losses.sigmoid_loss)
    captioners  caption_logits(params, images, decoder_input_ids, mask) ->
                (B, T, V) (position t predicts token t + 1), caption(params,
                images, max_length) -> greedy tokens (B, max_length) starting
                with decoder_start_token_id, max_length, max_positions,
                vocab_size and the special token ids (captioner and blip2;
                each has its own decoding: encode, init_cache, decode_step or
                prefill, decode_step)

and the module exposes MODEL (that class) and the conversion functions listed
at convert.MODEL_KINDS (from_hf, key_map, config_to_hf, preprocessor_config,
load_tokenizer, vocab_size). Training, generation and conversion use only this
surface, never a family's config fields.

A checkpoint format that is not HF's but builds an existing family (open_clip
folders build a CLIP) is a converter module (open_clip), not a family: it maps
its config and state dict to the family's HF ones, and convert picks it by the
folder's files (convert.checkpoint_format).
"""
