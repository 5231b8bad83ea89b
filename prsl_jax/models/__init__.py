"""CLIP: the flax module (clip), HF checkpoint conversion (convert), tokenizer builder."""
