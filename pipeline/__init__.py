"""Text-based person search with proximity data generation (PDG).

Subpackages: `data` (sources, SynthPedes, canonical manifests and shards),
`metrics` (retrieval metrics); later: text, models, losses, pdg.
"""
