"""Models: CLIP (clip), SigLIP (siglip), the ViT-GPT-2 captioner (captioner) and its
decoding (generation); checkpoint conversion (convert: HF folders; open_clip: open_clip
folders; vision_weights: a vision tower put on a base CLIP); tokenizers (bpe_tokenizer:
CLIP's BPE offline, for open_clip folders; tokenizer: tiny offline builders)."""
