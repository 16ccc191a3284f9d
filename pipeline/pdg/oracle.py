"""The oracle generator (`pdg.method: oracle`, SynthPedes only): every caption edit's true image.

Instead of a diffusion model's guess, the renderer draws the source person again with the edited
item recoloured (pipeline/data/synthpedes/truth.py). The shards carry that image with the same
record as a generated one, so `filter`, `caption` and `train@pdg` run unchanged on it. Its rows
bound what proximity pairs can give when every edit is right. Some edits it cannot render. Those
are caption changes whose item or old colour the attributes do not confirm, i.e. parser mistakes.
They are dropped from the plan and counted (`edits_not_renderable` in metrics/generate.json).
"""

from __future__ import annotations

import dataclasses

import numpy as np
from PIL import Image

from pipeline.data.synthpedes.truth import Source, changed_region, true_edit
from pipeline.pdg.generate import EditFunction, GenerationJob, GenerationPlan


@dataclasses.dataclass(frozen=True)
class OracleResult:
    image: Image.Image  # the true edit
    mask: Image.Image  # white where it differs from the source


def oracle_plan(plan: GenerationPlan, seed: int) -> GenerationPlan:
    """The plan's jobs the renderer can draw the truth of (the same keys as a diffusion run's, less the
    counted unrenderable ones); ValueError naming the record when the data are not SynthPedes."""
    jobs = [job for job in plan.jobs if _true(job, seed)[0] is not None]
    return dataclasses.replace(plan, jobs=jobs, edits_not_renderable=len(plan.jobs) - len(jobs))


def oracle_editor(seed: int) -> EditFunction:
    """An edit function drawing each job's true edit; each source must re-render to its prepared image
    exactly, else the renderer or `synth.seed` changed since `prepare` and the truth would be another's."""

    def edit(jobs: list[GenerationJob], sources: list[Image.Image]) -> list[OracleResult]:
        results = []
        for job, image in zip(jobs, sources):
            truth, why = _true(job, seed)
            if truth is None:
                raise ValueError(f"pdg.method oracle: the edit of {job.key} cannot be rendered ({why})")
            if changed_region(truth.source.render(), image.convert("RGB")).any():
                raise ValueError(f"pdg.method oracle: record {job.source.key} ({job.source.image_path}) does not "
                                 "re-render to its prepared image: synth.seed or the renderer changed since `prepare`")
            mask = Image.fromarray(np.where(truth.region, 255, 0).astype(np.uint8), mode="L")
            results.append(OracleResult(truth.image, mask))
        return results

    return edit


def _true(job: GenerationJob, seed: int):
    return true_edit(Source.of(job.source, seed), [change.to_json() for change in job.edit.changes])
