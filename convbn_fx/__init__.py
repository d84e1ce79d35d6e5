"""convbn_fx: a torch.fx pass that makes Conv→BatchNorm blocks cheap to fine-tune.

    model = convbn_fx.tune_mode(torch.fx.symbolic_trace(model))   # or tune_mode(model)

After You et al., "Efficient ConvBN Blocks for Transfer Learning and Beyond" (ICLR 2024,
arXiv 2305.11624).
"""

from .api import describe, tune_mode
from .blocks import BlockInfo
from .deploy_export import deploy_mode
from .errors import ConvBNError, LoweringError, ModeError, TraceError
from .export import tune_exported
from .kinds import declare_frozen_norm, declare_leaf, declare_safe
from .parts import TunedPart
from .tracing import declare_leaf_function
from .modes import Mode
from .passes import get_lowerings, register_lowering
from . import scaled_ops  # noqa: F401  registers convbn_fx::conv_scaled and ::linear_scaled
from .tuned import TunedGraphModule

__version__ = "0.1.0"

__all__ = [
    "tune_mode", "describe", "Mode", "BlockInfo", "register_lowering", "get_lowerings",
    "declare_safe", "declare_leaf", "declare_frozen_norm", "declare_leaf_function",
    "TunedGraphModule", "TunedPart", "ConvBNError", "TraceError", "ModeError",
    "LoweringError", "deploy_mode", "backend", "pre_grad_pass", "tune_exported",
]


def __getattr__(name):
    # The torch.compile entry points import torch._inductor: only when asked for.
    if name in ("backend", "pre_grad_pass"):
        from . import compile

        return getattr(compile, name)
    raise AttributeError(f"module 'convbn_fx' has no attribute {name!r}")
