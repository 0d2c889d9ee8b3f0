"""Sampling: per-sample seeds, snapshot loading, EOT translation, diffusion samplers and DPM-OT."""


class GenerationError(ValueError):
    """Bad input to generation (snapshot, export, data, options); the message says what to do."""
