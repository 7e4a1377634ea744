"""Evaluation: zero-shot classification (`zeroshot`), image<->text retrieval (`retrieval`),
the list of evaluations a config asks for (`setup.run_evals`) and `mmpretrain eval` on a saved
model (`offline`)."""
from __future__ import annotations


class EvalSetupError(ValueError):
    """An evaluation cannot be set up as configured (the message names the key or file)."""
