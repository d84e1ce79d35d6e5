"""convbn_fx: a torch.fx pass that makes Conv→BatchNorm blocks cheap to fine-tune.

    model = convbn_fx.tune_mode(torch.fx.symbolic_trace(model))   # or tune_mode(model)

After You et al., "Efficient ConvBN Blocks for Transfer Learning and Beyond" (ICLR 2024,
arXiv 2305.11624). The package is in layers, each a subpackage importing only from itself
and the layers below: vocabulary → kernels → passes → graph → model → frontends → tools
(see the README's architecture map). This module re-exports the public names.
"""

from .frontends.deploy_mode import deploy_mode
from .frontends.export import tune_exported
from .frontends.tune import describe, tune_mode
from .graph.tune_graph import TuneResult, tune_graph
from .model.parts import TunedPart
from .model.tuned import TunedGraphModule
from .passes import get_lowerings, register_lowering
from .vocabulary.blocks import BlockInfo
from .vocabulary.errors import ConvBNError, LoweringError, ModeError, TraceError
from .vocabulary.kinds import declare_frozen_norm, declare_leaf, declare_leaf_function, declare_safe
from .vocabulary.modes import Mode

__version__ = "0.1.0"

__all__ = [
    "tune_mode", "describe", "Mode", "BlockInfo", "register_lowering", "get_lowerings",
    "declare_safe", "declare_leaf", "declare_frozen_norm", "declare_leaf_function",
    "TunedGraphModule", "TunedPart", "ConvBNError", "TraceError", "ModeError",
    "LoweringError", "deploy_mode", "backend", "pre_grad_pass", "tune_exported",
    "tune_graph", "TuneResult",
]


def __getattr__(name):
    # The torch.compile entry points import torch._inductor: only when asked for.
    if name in ("backend", "pre_grad_pass"):
        from .frontends import compile

        return getattr(compile, name)
    raise AttributeError(f"module 'convbn_fx' has no attribute {name!r}")
