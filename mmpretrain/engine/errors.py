"""Exceptions the trainer raises on purpose (importable without torch or DeepSpeed)."""


class NonFiniteTrainingError(RuntimeError):
    """Too many consecutive steps with a non-finite loss or gradient."""
