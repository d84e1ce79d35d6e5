"""Deploy's constant fold: `(W·s, b')` computed once without autograd, refolded on change.

Deploy is right only when no gradient must reach the block's parameters; folding on every
call would waste the weight-sized work, so the result is cached per conv weight and refolded
whenever one of its tensors changes (an optimizer step, `load_state_dict`, `copy_`, `.to()`),
so it is never stale. Fake tensors (`convbn-fx measure --estimate`, a fake-mode trace) are
folded on every call and never cached: they have no storage to stamp.
"""

from __future__ import annotations

import torch
from torch._subclasses.fake_tensor import is_fake
from torch.utils.weak import WeakIdKeyDictionary

from .fold import fold

__all__ = ["frozen_fold"]

# Folded Deploy weights, per conv weight, keyed by which BN tensors they were folded with.
# Weak keys: the cache lives exactly as long as the conv weight does.
# Keyed by identity: weakref.WeakKeyDictionary compares tensor keys with ==, which is
# elementwise and raises on every cache hit.
_FROZEN: "WeakIdKeyDictionary[torch.Tensor, dict]" = WeakIdKeyDictionary()


def _stamp(tensors) -> tuple:
    # Identity, storage and in-place version: any optimizer step, copy_, load_state_dict,
    # .to() or reassignment changes one of them.
    return tuple((None if t is None else (id(t), t.data_ptr(), t._version, t.dtype))
                 for t in tensors)


def frozen_fold(weight: torch.Tensor, bias: torch.Tensor | None, mean: torch.Tensor,
                var: torch.Tensor, gamma: torch.Tensor | None, beta: torch.Tensor | None,
                eps: float, transposed: bool = False, groups: int = 1,
                watch: torch.Tensor | None = None,
                cache: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Deploy's constant (W·s, b'): folded once, refolded whenever an input tensor changes.

    The result carries no gradient to the block's parameters (Deploy is chosen only when none
    requires one); gradients still flow to the conv's input through the conv that uses it.
    `watch` is BN's `num_batches_tracked`: a training-mode BN forward updates the running
    statistics inside the kernel without bumping their version, but it does bump that counter.
    `cache=False` when an input is computed on every call (a standardised weight): a fresh
    tensor may reuse a dead one's id, storage and version, so its stamp proves nothing.
    """
    tensors = (weight, bias, mean, var, gamma, beta)
    if (not cache or torch.compiler.is_compiling() or torch.compiler.is_exporting()
            or torch.is_inference_mode_enabled() or is_fake(weight)):
        # Compilers constant-fold this themselves; inference tensors must not be cached, as
        # they cannot be used later outside inference mode; a fake tensor's data_ptr() (in the
        # stamp) is deprecated and will raise.
        with torch.no_grad():
            return fold(*tensors, eps, transposed, groups)
    per_weight = _FROZEN.setdefault(weight, {})
    key = (id(mean), id(var), eps, transposed, groups)
    stamp = _stamp(tensors + (watch,))
    hit = per_weight.get(key)
    if hit is not None and hit[0] == stamp:
        return hit[1], hit[2]
    with torch.no_grad():
        folded_w, folded_b = fold(*tensors, eps, transposed, groups)
    per_weight[key] = (stamp, folded_w, folded_b)
    return folded_w, folded_b
