"""Text-based person search with proximity data generation (PDG): the library the stages run.

core/        what every stage imports: typed params, profiles and input checks, atomic writes, process set-up, devices
data/        sources (SynthPedes, CUHK-PEDES, ICFG-PEDES, RSTPReid), the canonical manifests and shards, the loader
text/        caption tools: colour phrases, colour edits, approximate variants (online PDG)
models/      the dual encoder: towers, presets, tokenizers, preprocessing, embedding
losses.py    the contrastive losses and their distributed gather
metrics.py   retrieval metrics (R@k, mAP, CMC)
evaluation.py  a split's retrieval scores and colour sensitivity
training.py  the trainer; checkpointing.py its resumable state; optimization.py optimizer, schedule, Accelerator
run_folder.py  resumable fingerprinted output folders (models/<variant>, data/pdg/raw)
generator/   the diffusion generator (Stable Diffusion layout): build, train, load, probe
editing/     image editing with a loaded generator: Prompt-to-Prompt, inversion, SDEdit
pdg/         the making of proximity pairs: plan and generate, filter, caption
search/      the gallery index, the search CLI and the local search page
externals.py digests of what params name outside the repository
imports.py   a stage's import closure (its code digest, its dvc.yaml deps)
plots.py     figures the stages write
cli.py       `python -m pipeline <command>`; stage_command.py a stage's command as dvc.yaml gives it

The name `pipeline` stays: it is the project's package. A diffusers `StableDiffusionPipeline` is
held as `sd`, its loaded components as `parts`, never under the package's name.
"""
