"""Data: source adapters, validation, the SynthPedes renderer and the canonical form."""
