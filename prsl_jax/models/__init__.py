"""Models: CLIP (clip), the ViT-GPT-2 captioner (captioner) and its decoding
(generation), HF checkpoint conversion (convert), offline tokenizer builders."""
