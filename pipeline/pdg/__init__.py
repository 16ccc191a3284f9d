"""Proximity data generation: the making of proximity pairs from training pairs.

- `generate` plans and runs the edits into shards.
- `cost` counts UNet evaluations, with the formula and a counting hook.
- `filtering` scores and keeps pairs.
- `captioning` makes training texts and identities.
- `crops` makes person crops for CLIP/BLIP processors.

The generator is `pipeline.generator`, and the editing is `pipeline.editing`.
Nothing is imported here, so light users of the package do not pay for importing diffusers.
"""
