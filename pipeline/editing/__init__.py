"""Image editing: make a source person crop match an edited caption, with a loaded generator.

- `edit` holds the entry points, Prompt-to-Prompt and SDEdit, batched.
- `inversion` does DDIM, negative-prompt and null-text inversion.
- `p2p` holds the Prompt-to-Prompt attention processors.
- `alignment` does the prompt token alignment of a word swap.
- `sampling` does guided DDIM.

Nothing is imported here.
"""
