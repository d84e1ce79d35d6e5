"""SPEC → nn.Module: how `convbn-fx report` and `convbn-fx measure` name the model to build.

A user points the CLI at a model the way they already name it: a torchvision name
(`resnet50`), a timm name (`timm/efficientnet_b0`, the zoo most fine-tuning starts from), a
Hugging Face transformers model type or config class (`hf/resnet`, `hf/DetrConfig`: its
default config, `AutoModel.from_config`), or their own builder (`myproj.models:build`, as
for MONAI's networks). Every model is built with random weights and nothing is downloaded,
so the commands run offline and in CI. timm, torchvision and transformers are imported only
when a SPEC of theirs is given. Every mistake is a ConvBNError sentence.
"""

from __future__ import annotations

import difflib
import importlib
import inspect

import torch.nn as nn

from ..vocabulary.errors import ConvBNError, exception_summary

__all__ = ["build_model", "TIMM_PREFIX", "HF_PREFIX"]

TIMM_PREFIX = "timm/"
HF_PREFIX = "hf/"


def _random_weight_kwargs(fn) -> dict:
    """weights=None / weights_backbone=None where `fn` takes them: never download weights."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return {}
    return {name: None for name in ("weights", "weights_backbone") if name in params}


def _did_you_mean(name: str, known) -> str:
    close = difflib.get_close_matches(name, known, n=3)
    return f" (did you mean {', '.join(close)}?)" if close else ""


def _torchvision_builder(name: str):
    try:
        import torchvision.models as tvm
    except ImportError:
        raise ConvBNError(f"{name!r} is read as a torchvision model name but torchvision is not "
                          "installed; install it or pass package.module:callable.") from None
    known = tvm.list_models()
    if name not in known:
        raise ConvBNError(f"unknown torchvision model {name!r}{_did_you_mean(name, known)}; "
                          "for your own model pass package.module:callable.")
    return tvm.get_model_builder(name)


def _timm_model(spec: str) -> nn.Module:
    """`timm/NAME` (or `timm/NAME.TAG`): timm.create_model(NAME, pretrained=False)."""
    name = spec[len(TIMM_PREFIX):]
    try:
        import timm
    except ImportError:
        raise ConvBNError(f"{spec} names a timm model but timm is not installed; "
                          "pip install timm.") from None
    if not name or not timm.is_model(name):
        known = timm.list_models()
        raise ConvBNError(f"unknown timm model {name!r}{_did_you_mean(name, known)}; "
                          "timm.list_models() lists the names.")
    try:
        return timm.create_model(name, pretrained=False)
    except Exception as exc:  # a timm builder can fail in any way
        raise ConvBNError(f"timm.create_model({name!r}) raised {exception_summary(exc)}."
                          ) from None


def _hf_model(spec: str) -> nn.Module:
    """`hf/MODEL_TYPE` or `hf/ConfigClass`: AutoModel.from_config of its default config,
    with no pretrained backbone (nothing is downloaded)."""
    name = spec[len(HF_PREFIX):]
    try:
        import transformers
    except ImportError:
        raise ConvBNError(f"{spec} names a Hugging Face model but transformers is not "
                          "installed; pip install transformers.") from None
    types = transformers.CONFIG_MAPPING
    by_class = {cls.__name__: cls for cls in types.values()}
    config_cls = types[name] if name in types else by_class.get(name)
    if config_cls is None:
        raise ConvBNError(f"unknown transformers model type or config class {name!r}"
                          f"{_did_you_mean(name, list(types.keys()) + list(by_class))}; "
                          "transformers.CONFIG_MAPPING lists the model types.")
    try:
        config = config_cls()
        for flag in ("use_pretrained_backbone", "use_timm_backbone"):
            if hasattr(config, flag):
                setattr(config, flag, False)
        return transformers.AutoModel.from_config(config)
    except Exception as exc:  # a config or model class can fail in any way
        raise ConvBNError(f"AutoModel.from_config({config_cls.__name__}()) raised "
                          f"{exception_summary(exc)}.") from None


def _import_target(spec: str):
    module_name, _, attr_path = spec.partition(":")
    if not module_name or not attr_path:
        raise ConvBNError(f"SPEC {spec!r} should look like package.module:callable.")
    try:
        target = importlib.import_module(module_name)
    except Exception as exc:  # a user module can fail to import in any way
        raise ConvBNError(f"could not import {module_name!r} ({exception_summary(exc)}); "
                          "run from the project root or put it on PYTHONPATH.") from None
    for part in attr_path.split("."):
        if not hasattr(target, part):
            raise ConvBNError(f"{module_name!r} has no attribute {attr_path!r}; check the "
                              "name after the colon.")
        target = getattr(target, part)
    return target


def build_model(spec: str) -> nn.Module:
    """The nn.Module SPEC names, built with random weights; ConvBNError for bad input.

    Args:
        spec: a torchvision model name, `timm/NAME`, `hf/MODEL_TYPE` (or `hf/ConfigClass`),
            or `package.module:callable` (called with no arguments,
            `weights=None`/`weights_backbone=None` where it takes them).
    """
    if spec.startswith(HF_PREFIX):
        return _hf_model(spec)
    if ":" in spec:
        target = _import_target(spec)
    elif spec.startswith(TIMM_PREFIX):
        return _timm_model(spec)
    else:
        target = _torchvision_builder(spec)
    if isinstance(target, nn.Module):
        return target
    if not callable(target):
        raise ConvBNError(f"{spec} is not callable ({type(target).__name__}); point SPEC at a "
                          "function or class that returns an nn.Module.")
    kwargs = _random_weight_kwargs(target)
    try:
        inspect.signature(target).bind(**kwargs)
    except TypeError:
        raise ConvBNError(f"{spec} needs arguments; SPEC must name a callable that takes none "
                          "(wrap it in a function that builds your model).") from None
    except ValueError:  # no signature to check (a builtin): just call it
        pass
    try:
        model = target(**kwargs)
    except Exception as exc:  # whatever the user's builder raises is bad input here
        raise ConvBNError(f"calling {spec}() raised {exception_summary(exc)}.") from None
    if not isinstance(model, nn.Module):
        raise ConvBNError(f"{spec}() returned a {type(model).__name__}, not an nn.Module.")
    return model
