"""ZeRO-1/2: skip re-pointing every parameter at its slice of the flat buffer when none moved.

At the end of each step DeepSpeed's `DeepSpeedZeroOptimizer.step` calls
`_update_model_bit16_weights` for every group ("TODO: we probably don't need this? just to be
safe"): per parameter `p.data = flat.narrow(offset, numel).view(shape).data`, then once more
through its round-robin order. Every parameter already is exactly that view (the all-gather
writes into the flat buffer in place), so on ViT-B/16's 302 parameters this is ~3,600 host
ops of no effect, run while the GPU has nothing queued after the optimizer kernels.

`install_repoint_check` replaces the method on one optimizer instance by a check that each
parameter of the group still starts at its offset in the flat buffer with the slice's shape,
contiguous, in the buffer's dtype: then the re-point would change nothing and is skipped;
otherwise (a parameter's data was replaced, or the buffer itself moved, as offloading states
does) DeepSpeed's own method runs. `tests/engine_checks.py repoint` checks both paths.
"""
from __future__ import annotations

import types
from typing import Any

from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer


def _views_in_place(self: Any, group_index: int) -> bool:
    """Whether every parameter of the group already is its slice of the flat buffer."""
    flat = self.bit16_groups_flat[group_index]
    base, size = flat.data_ptr(), flat.element_size()
    for p, meta, offset in zip(self.round_robin_bit16_groups[group_index],
                               self.round_robin_bit16_meta[group_index],
                               self.round_robin_bit16_offsets[group_index]):
        if (p.data_ptr() != base + offset * size or p.shape != meta.shape
                or p.dtype != flat.dtype or not p.is_contiguous()):
            return False
    return True


def _repoint_if_moved(self: Any, group_index: int) -> None:
    """`_update_model_bit16_weights`, run only where it would change something."""
    if not _views_in_place(self, group_index):
        DeepSpeedZeroOptimizer._update_model_bit16_weights(self, group_index)


def install_repoint_check(optimizer: Any) -> bool:
    """Use `_repoint_if_moved` on a ZeRO-1/2 optimizer; True if installed."""
    if not isinstance(optimizer, DeepSpeedZeroOptimizer):
        return False
    optimizer._update_model_bit16_weights = types.MethodType(_repoint_if_moved, optimizer)
    return True
