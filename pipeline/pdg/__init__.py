"""Proximity data generation: the making of proximity pairs from training pairs.

`generate` (planning and running the edits into shards), `cost` (UNet evaluations: the formula and
a counting hook), `filtering` (scoring and keeping pairs), `captioning` (training texts and
identities), `crops` (person crops for CLIP/BLIP processors). The generator is `pipeline.generator`,
the editing `pipeline.editing`.
Nothing is imported here, so light users of the package do not pay for importing diffusers.
"""
