"""Whole-model pickles (issue 19): torch.save/torch.load, pickle, deepcopy, spawn arguments.

Many training scripts (and ultralytics, and `torch.multiprocessing.spawn` arguments) carry
the whole model object, not its state_dict. Every kind of rewritten model must come back
computing the same, with the same lowerings and the same generated code, and must go on
following state afterwards (a BN put in training mode changes that block to Train, `.eval()`
changes it back). A model that cannot be pickled for a reason outside convbn_fx (a lambda
attribute) is one ConvBNError sentence when torch.save starts.
"""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import timm
import torch
import torch.multiprocessing as mp
import torch.nn as nn
import torchvision
from torchvision.models.detection.backbone_utils import BackboneWithFPN

import convbn_fx
from convbn_fx import Mode
from convbn_fx.model.parts import is_rewritten, rewritten_graphs
from convbn_fx.model.pickling import PortableGraph, importable
from convbn_fx.tools.testing import finetune_state, frozen_state, output_tensors, randomize_bn
from tiny_resnet import TinyResNet, Untraced, build


def _finetuned(make):
    return lambda: finetune_state(randomize_bn(make()))


# name -> (model maker, input shape, the class a part keeps, or None when traced whole)
MODELS = {
    "resnet18": (_finetuned(lambda: torchvision.models.resnet18(num_classes=10)),
                 (2, 3, 32, 32)),
    "timm-efficientnet_b0": (_finetuned(lambda: timm.create_model("efficientnet_b0",
                                                                  num_classes=10)),
                             (2, 3, 32, 32)),
    "timm-efficientvit_m0": (_finetuned(lambda: timm.create_model("efficientvit_m0",
                                                                  num_classes=10)),
                             (1, 3, 64, 64)),
    "tiny-in-parts": (lambda: build(Untraced, dtype=torch.float32), (2, 3, 16, 16)),
}


def _save_load(model: nn.Module) -> nn.Module:
    """What users type: torch.save of the object, torch.load with weights_only=False."""
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


def _run(model: nn.Module, x) -> list[torch.Tensor]:
    torch.manual_seed(0)  # the same dropout masks for both models
    return output_tensors(model(x))


def _codes(model: nn.Module) -> dict[str, str]:
    return {name: gm.code for name, gm in rewritten_graphs(model)}


def _lowerings(model: nn.Module) -> list[tuple]:
    return [(i.conv, i.bn, i.kind, i.lowering, i.reason) for i in convbn_fx.describe(model)]


def _classes(model: nn.Module) -> list[type]:
    """The classes of a model, less those made at run time (parts, GraphModule's own)."""
    return [c for c in type(model).__mro__ if importable(c)]


def _assert_same(loaded: nn.Module, tuned: nn.Module, x) -> None:
    assert _classes(loaded) == _classes(tuned)
    assert _lowerings(loaded) == _lowerings(tuned)
    assert _codes(loaded) == _codes(tuned)
    for got, want in zip(_run(loaded, x), _run(tuned, x), strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def _first_block_bn(model: nn.Module, lowering: Mode) -> str:
    return next(i.bn for i in convbn_fx.describe(model) if i.lowering is lowering)


@pytest.fixture(params=list(MODELS), scope="module")
def saved(request):
    """(name, tuned, loaded, input) for each kind of rewritten model."""
    make, shape = MODELS[request.param]
    tuned = convbn_fx.tune_mode(make())
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    return request.param, tuned, _save_load(tuned), x


def test_save_load_computes_the_same_with_the_same_lowerings(saved):
    _, tuned, loaded, x = saved
    assert any(i.lowering is Mode.TUNE for i in convbn_fx.describe(loaded))
    _assert_same(loaded, tuned, x)
    assert loaded.state_dict().keys() == tuned.state_dict().keys()
    for (name, p), q in zip(loaded.named_parameters(), tuned.parameters(), strict=True):
        assert p is not q and torch.equal(p, q), name


def test_loaded_model_follows_state(saved):
    name, tuned, loaded, x = saved
    bn = _first_block_bn(loaded, Mode.TUNE)
    for model in (tuned, loaded):
        model.get_submodule(bn).train()
    lowered = {i.bn: i.lowering for i in convbn_fx.describe(loaded)}
    assert lowered[bn] is Mode.TRAIN
    _assert_same(loaded, tuned, x)  # the training-mode forward also updates the statistics
    for model in (tuned, loaded):
        model.get_submodule(bn).eval()
    assert {i.bn: i.lowering for i in convbn_fx.describe(loaded)}[bn] is Mode.TUNE
    _assert_same(loaded, tuned, x)
    if name.startswith("timm"):
        return  # every timm part traces again on .eval() (seconds on this CPU): below is enough
    for model in (tuned, loaded):
        model.eval().requires_grad_(False)
    assert {i.lowering for i in convbn_fx.describe(loaded) if i.reason is None} == {Mode.DEPLOY}
    with torch.no_grad():
        _assert_same(loaded, tuned, x)


def test_parts_keep_their_class_and_share_the_tree_after_load():
    make, shape = MODELS["timm-efficientvit_m0"]
    tuned = convbn_fx.tune_mode(make())
    loaded = _save_load(tuned)
    attention = type(make().stages[0].blocks[0].mixer.m.attn)
    parts = [m for m in loaded.modules() if isinstance(m, convbn_fx.TunedPart)]
    assert parts and all(isinstance(p, attention) for p in parts)
    for part in parts:
        gm = part.__dict__["_convbn_part"]
        assert gm._modules is part._modules and gm._parameters is part._parameters
        # what is traced again (a `self.training` branch flips) is the part's own dict
        assert gm.convbn_tuning.source.__dict__ is part.__dict__
    path = next(name for name, m in loaded.named_modules() if m is parts[0])
    for model in (tuned, loaded):  # its forward reads self.training: traced again, as a part
        model.get_submodule(path).eval()
    _assert_same(loaded, tuned, torch.randn(shape, generator=torch.Generator().manual_seed(1)))


def test_a_retrace_after_load_reads_the_parts_own_attributes():
    tuned = convbn_fx.tune_mode(build(Untraced, dtype=torch.float32))
    tuned.net.register_forward_hook(_double)  # the root's part keeps the hook
    loaded = _save_load(tuned)
    x = torch.randn(2, 3, 16, 16)
    loaded.net.layer2.register_forward_hook(_double)  # layer2 becomes a call: a new trace
    tuned.net.layer2.register_forward_hook(_double)
    _assert_same(loaded, tuned, x)


def test_weights_only_load_says_how():
    tuned = convbn_fx.tune_mode(build(dtype=torch.float32))
    buf = io.BytesIO()
    torch.save(tuned, buf)
    buf.seek(0)
    with pytest.raises(pickle.UnpicklingError, match="weights_only"):
        torch.load(buf)  # torch >= 2.6 loads weights only by default


def test_detector_round_trip():
    """A torchvision detector: untraceable Python around a backbone part (BackboneWithFPN)."""
    torch.manual_seed(0)
    model = torchvision.models.detection.fasterrcnn_mobilenet_v3_large_320_fpn(
        weights=None, weights_backbone=None, num_classes=5, box_score_thresh=0.0,
        rpn_pre_nms_top_n_test=50, rpn_post_nms_top_n_test=20, box_detections_per_img=10)
    tuned = convbn_fx.tune_mode(frozen_state(randomize_bn(model)))
    loaded = _save_load(tuned)
    assert isinstance(loaded.backbone, BackboneWithFPN)
    assert isinstance(loaded.backbone, convbn_fx.TunedPart)
    images = [torch.rand(3, 96, 112, generator=torch.Generator().manual_seed(2))]
    with torch.no_grad():
        _assert_same(loaded, tuned, images)
        assert len(tuned(images)[0]["boxes"]) > 0  # the comparison compared something
    assert {i.lowering for i in convbn_fx.describe(loaded)} == {Mode.DEPLOY}
    for m in (tuned, loaded):
        m.backbone.requires_grad_(True)
    assert {i.lowering for i in convbn_fx.describe(loaded)} == {Mode.TUNE}
    with torch.no_grad():
        _assert_same(loaded, tuned, images)


def test_plain_pickle_and_deepcopy_of_parts():
    tuned = convbn_fx.tune_mode(build(Untraced, dtype=torch.float32))
    x = torch.randn(2, 3, 16, 16)
    for copied in (pickle.loads(pickle.dumps(tuned)), copy.deepcopy(tuned)):
        _assert_same(copied, tuned, x)
        copied.net.layer1[0].bn1.train()  # the copy follows its own state, not the original
        assert {i.bn: i.lowering for i in convbn_fx.describe(copied)}["net.layer1.0.bn1"] \
            is Mode.TRAIN
        assert {i.lowering for i in convbn_fx.describe(tuned)} == {Mode.TUNE}


def test_symbolically_traced_input_and_graph_module_parts(tmp_path):
    """A GraphModule handed in (no source to trace again), and one kept as a part (hooks)."""
    plain = build(dtype=torch.float32)
    x = torch.randn(2, 3, 16, 16)
    traced = torch.fx.symbolic_trace(plain)
    tuned = convbn_fx.tune_mode(traced)
    _assert_same(_save_load(tuned), tuned, x)
    hooked = torch.fx.symbolic_trace(plain)
    hooked.register_forward_hook(_double)
    part = convbn_fx.tune_mode(hooked)
    assert isinstance(part, convbn_fx.TunedPart) and isinstance(part, torch.fx.GraphModule)
    loaded = _save_load(part)
    assert isinstance(loaded, convbn_fx.TunedPart) and isinstance(loaded, torch.fx.GraphModule)
    assert loaded.code == part.code  # the part's own (unrewritten) graph survives too
    _assert_same(loaded, part, x)
    torch.testing.assert_close(loaded(x), 2 * plain(x), rtol=1e-5, atol=1e-6)


def _double(module, args, output):
    return output * 2


def test_hooks_added_after_the_rewrite_survive_and_can_be_removed():
    plain = build(dtype=torch.float32)
    tuned = convbn_fx.tune_mode(copy.deepcopy(plain))
    x = torch.randn(2, 3, 16, 16)
    tuned.layer1[1].register_forward_hook(_double)
    tuned(x)  # traced again: layer1.1 becomes a part in place, so its hook runs
    loaded = _save_load(tuned)
    assert isinstance(loaded.layer1[1], convbn_fx.TunedPart)
    _assert_same(loaded, tuned, x)
    assert not torch.allclose(loaded(x), plain(x))
    loaded.layer1[1]._forward_hooks.clear()
    torch.testing.assert_close(loaded(x), plain(x), rtol=1e-5, atol=1e-6)


def only_layer1(info):
    """A module-level mode policy: pickled by reference, like any function."""
    return Mode.DEPLOY if info.conv.startswith("layer1") else None


def test_a_mode_policy_is_kept():
    tuned = convbn_fx.tune_mode(build(dtype=torch.float32).requires_grad_(False), only_layer1)
    loaded = _save_load(tuned)
    assert loaded.convbn_mode is only_layer1
    assert {i.lowering for i in convbn_fx.describe(loaded)} == {Mode.DEPLOY, None}
    _assert_same(loaded, tuned, torch.randn(2, 3, 16, 16))


@pytest.mark.parametrize("where", ["attribute", "inner attribute", "policy", "part attribute"])
def test_what_does_not_pickle_is_one_convbn_error_sentence(where):
    if where == "policy":
        tuned = convbn_fx.tune_mode(build(dtype=torch.float32), lambda info: None)
        named = "its mode policy"
    elif where == "part attribute":
        tuned = convbn_fx.tune_mode(build(Untraced, dtype=torch.float32))
        tuned.net.transform = lambda x: x
        named = "its transform"  # named from the part, the outermost rewritten module
    else:
        tuned = convbn_fx.tune_mode(build(dtype=torch.float32))
        target, named = ((tuned, "its transform") if where == "attribute"
                         else (tuned.layer1[0], "its layer1.0.transform"))
        target.transform = lambda x: x
    with pytest.raises(convbn_fx.ConvBNError) as info:
        torch.save(tuned, io.BytesIO())
    message = str(info.value)
    assert named in message and "lambda" in message and "state_dict" in message, message
    assert "\n" not in message and message.count(". ") == 0 and message.endswith(".")


def _spawned(rank: int, model: nn.Module, x: torch.Tensor, queue) -> None:
    model.layer1[0].bn1.train()  # the child's model follows its own state
    lowered = {i.bn: i.lowering for i in convbn_fx.describe(model)}["layer1.0.bn1"]
    queue.put((model(x).tolist(), lowered))  # plain lists: a tensor would be shared memory


def test_spawn_argument_round_trip():
    """The model as a `torch.multiprocessing.spawn` argument (pickled by ForkingPickler)."""
    plain = build(dtype=torch.float32)
    tuned = convbn_fx.tune_mode(plain)
    x = torch.randn(2, 3, 16, 16)
    queue = mp.get_context("spawn").SimpleQueue()
    mp.spawn(_spawned, args=(tuned, x, queue), nprocs=1, join=True)
    out, lowered = queue.get()
    assert lowered is Mode.TRAIN
    plain.layer1[0].bn1.train()
    torch.testing.assert_close(torch.tensor(out), plain(x), rtol=1e-5, atol=1e-6)


def test_pickled_graph_keeps_node_names_and_targets():
    """The traced graph travels as a flat node list (pickling.PortableGraph)."""
    graph = convbn_fx.tune_mode(build(TinyResNet)).convbn_tuning.template
    again = pickle.loads(pickle.dumps(PortableGraph.of(graph))).build()
    again.lint()
    assert [(n.op, n.name, n.target) for n in again.nodes] == \
        [(n.op, n.name, n.target) for n in graph.nodes]
    assert str(again) == str(graph)


class _SkipIf(nn.Module):
    """A forward whose trace takes the wrong branch (`hasattr` of a Proxy is always True): the
    trace check fails, and the module runs its own forward with its children rewritten on
    their own."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8))
        self.body = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8))

    def forward(self, x):
        s = self.stem(x)
        if hasattr(s, "no_such_attribute"):
            s = s + 1
        return self.body(s)


def test_a_model_whose_trace_failed_its_check_round_trips():
    model = finetune_state(randomize_bn(_SkipIf()))
    tuned = convbn_fx.tune_mode(model)
    x = torch.randn(2, 3, 8, 8)
    expected = model(x)
    torch.testing.assert_close(tuned(x), expected)  # the check failed: the children are parts
    assert all(is_rewritten(c) for c in tuned.children())
    loaded = _save_load(tuned)
    assert all(is_rewritten(c) for c in loaded.children())
    torch.testing.assert_close(loaded(x), expected)
    assert _lowerings(loaded) == _lowerings(tuned)
