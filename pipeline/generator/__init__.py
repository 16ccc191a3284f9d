"""The generator of proximity data: a text-to-image latent diffusion model in Stable Diffusion's layout.

- `model` loads any StableDiffusionPipeline folder (the embedded one or a real checkpoint) for editing.
- `build`, `data` and `training` make the embedded one.
- `checkpoint` saves it or points at a pretrained one.
- `samples` draws pictures of it.
- `probe` is the attribute probe that measures it.
- `caption_tokenizer` is the BPE tokenizer its small CLIP text encoder can learn.

Nothing is imported here, so light users do not pay for importing diffusers.
"""
