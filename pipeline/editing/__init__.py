"""Image editing: make a source person crop match an edited caption, with a loaded generator.

`edit` (the entry points: Prompt-to-Prompt and SDEdit, batched), `inversion` (DDIM, negative-prompt
and null-text inversion), `p2p` (Prompt-to-Prompt attention processors), `alignment` (prompt token
alignment of a word swap), `sampling` (guided DDIM). Nothing is imported here.
"""
