"""Proximity data generation (PDG).

Image editing with a Stable-Diffusion-layout model: `model` (loading, tiny test models, crop
fitting), `alignment` (prompt token alignment), `p2p` (Prompt-to-Prompt attention processors),
`inversion` (DDIM and null-text inversion), `sampling` (guided DDIM), `editing` (entry points).
Nothing is imported here, so light users of the package do not pay for importing diffusers.
"""
