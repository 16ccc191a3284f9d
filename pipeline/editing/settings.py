"""The editing knobs as one frozen object, built from the pdg config and handed whole to every step.

It has no defaults: params.yaml (through `EditSettings.from_config`) is their one source, and tests
spell out every value. Fractions of the steps become step counts here, once (`cross_replace_steps`...).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from pipeline.core.config import PdgConfig

# the inversion methods `pdg.inversion` accepts (its choices in pipeline/core/config.py)
INVERSIONS = next(f for f in fields(PdgConfig) if f.name == "inversion").metadata["choices"]


@dataclass(frozen=True)
class EditSettings:
    """How an edit runs: the DDIM schedule, the inversion, Prompt-to-Prompt control, SDEdit strength."""

    num_steps: int  # DDIM steps, inversion and sampling alike
    guidance: float  # classifier-free guidance scale
    inversion: str  # p2p: ddim | negative-prompt | null-text (pipeline/editing/inversion.py)
    null_text_steps: int  # p2p: Adam steps per timestep of null-text inversion
    cross_replace_fraction: float  # p2p: share of the steps whose cross-attention follows the source
    self_replace_fraction: float  # p2p: share of the steps whose self-attention follows the source
    blend_threshold: float | None  # p2p: local-blend mask threshold; None: no local blend
    blend_start_fraction: float  # p2p: share of the steps before local blending starts
    reweight: float  # p2p: attention factor of the edited words
    strength: float  # img2img: share of the steps SDEdit runs

    def __post_init__(self):
        if self.inversion not in INVERSIONS:
            raise ValueError(f"unknown inversion method {self.inversion!r}")
        if self.inversion == "null-text" and self.null_text_steps < 1:
            raise ValueError("null-text inversion needs null_text_steps >= 1")

    @classmethod
    def from_config(cls, cfg: PdgConfig) -> EditSettings:
        """The pdg section's knobs; its `blend_threshold` 0 (no local blend) becomes None."""
        return cls(
            num_steps=cfg.num_steps,
            guidance=cfg.guidance,
            inversion=cfg.inversion,
            null_text_steps=cfg.null_text_steps,
            cross_replace_fraction=cfg.cross_replace_fraction,
            self_replace_fraction=cfg.self_replace_fraction,
            blend_threshold=cfg.blend_threshold or None,
            blend_start_fraction=cfg.blend_start_fraction,
            reweight=cfg.reweight,
            strength=cfg.strength,
        )

    @property
    def cross_replace_steps(self) -> int:
        return round(self.cross_replace_fraction * self.num_steps)

    @property
    def self_replace_steps(self) -> int:
        return round(self.self_replace_fraction * self.num_steps)

    @property
    def blend_start_step(self) -> int:
        return round(self.blend_start_fraction * self.num_steps)
