"""The model lists of `bench.zoo`: timm, torchvision, Hugging Face and MONAI.

timm and torchvision models are built by name. Hugging Face and MONAI models are built from
their config classes / constructors with random weights (no download: HF_HUB_OFFLINE=1) and
shrunk to a few layers and channels, so each zoo runs in minutes on 2 CPU cores. A
`ZooModel` names a builder and the input it takes: one tensor, batch first. Hugging Face
backbones are the library's own (`use_timm_backbone=False`, no pretrained weights);
detection models take `pixel_values` alone (their `pixel_mask` defaults to ones).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable

import torch.nn as nn

__all__ = ["ZooModel", "FAMILIES", "TORCHVISION", "SIZES", "QUICK", "HF", "HF_QUICK", "MONAI",
           "MONAI_QUICK", "ZOOS", "build_timm", "build_torchvision"]

os.environ.setdefault("HF_HUB_OFFLINE", "1")

# One or two small members per timm family (timm 1.0.31), as the README table lists them.
FAMILIES: dict[str, list[str]] = {
    "EfficientNet": ["efficientnet_b0", "tf_efficientnet_b0"],
    "MobileNetV1/V2": ["mobilenetv1_100", "mobilenetv2_050"],
    "MobileNetV3/V4": ["mobilenetv3_small_050", "tf_mobilenetv3_small_minimal_100",
                       "mobilenetv4_conv_small"],
    "MNASNet/FBNet/LCNet": ["mnasnet_small", "fbnetc_100", "lcnet_050"],
    "MixNet/TinyNet/HardCoReNAS": ["mixnet_s", "tinynet_e", "hardcorenas_a"],
    "RegNet": ["regnetx_002", "regnety_002", "regnetz_b16"],
    "CSPNet/DarkNet": ["cspresnet50", "cs3darknet_focus_s", "darknet17"],
    "VoVNet/GerNet/DPN": ["ese_vovnet19b_slim_dw", "gernet_s", "dpn48b"],
    "DenseNet/Inception": ["densenet121", "inception_v3", "inception_v4"],
    "RepVGG/MobileOne": ["repvgg_a0", "mobileone_s0"],
    "ResNet(-ts)": ["resnet18", "resnet50d", "resnext26ts", "gcresnext26ts", "eca_resnext26ts"],
    "MobileViT/EfficientViT": ["mobilevit_xxs", "efficientvit_m0"],
    "GhostNet/ReXNet/HRNet": ["ghostnet_050", "rexnet_100", "hrnet_w18_small"],
}
# torchvision's classification and segmentation families, for the same table.
TORCHVISION = ["resnet18", "resnet50", "resnext50_32x4d", "wide_resnet50_2", "mobilenet_v2",
               "mobilenet_v3_small", "mobilenet_v3_large", "efficientnet_b0",
               "efficientnet_v2_s", "mnasnet0_5", "regnet_y_400mf", "regnet_x_400mf",
               "shufflenet_v2_x0_5", "densenet121", "googlenet", "inception_v3", "vgg11_bn",
               "squeezenet1_0", "convnext_tiny", "fcn_resnet50", "deeplabv3_mobilenet_v3_large",
               "lraspp_mobilenet_v3_large"]
# Models whose stride needs a larger input than the sweep's default.
SIZES = {"inception_v3": 96, "inception_v4": 128, "tv/inception_v3": 96,
         "inception_resnet_v2": 128, "bat_resnext26ts": 256, "botnet26t_256": 256,
         "halonet26t": 256, "levit_128s": 224}
# A representative subset that runs in well under a minute on 2 cores (tests/test_zoo.py).
QUICK = ["efficientnet_b0", "tf_efficientnet_b0", "mobilenetv2_050", "mobilenetv3_small_050",
         "tf_mobilenetv3_small_minimal_100", "mobilenetv4_conv_small", "mnasnet_small",
         "fbnetc_100", "lcnet_050", "mixnet_s", "tinynet_e", "hardcorenas_a", "regnetx_002",
         "regnety_002", "cs3darknet_focus_s", "ese_vovnet19b_slim_dw", "gernet_s", "dpn48b",
         "repvgg_a0", "mobileone_s0", "resnet18", "resnext26ts", "eca_resnext26ts",
         "mobilevit_xxs", "efficientvit_m0", "ghostnet_050"]


def build_timm(name: str) -> nn.Module:
    import timm

    return timm.create_model(name, pretrained=False)


def build_torchvision(name: str) -> nn.Module:
    import torchvision

    kwargs = {"weights": None}
    if name in ("fcn_resnet50", "deeplabv3_mobilenet_v3_large", "lraspp_mobilenet_v3_large"):
        kwargs["weights_backbone"] = None
    if name in ("googlenet", "inception_v3"):
        kwargs["aux_logits"], kwargs["init_weights"] = False, False
    return torchvision.models.get_model(name, **kwargs)


@dataclass(frozen=True)
class ZooModel:
    name: str
    build: Callable[[], nn.Module]
    shape: tuple[int, ...]          # the input tensor's shape, batch first
    family: str = ""


# ----------------------------------------------------------------------------- Hugging Face

_HGNET = dict(embedding_size=16, stem_channels=[3, 8, 16], stage_in_channels=[16, 32, 64, 96],
              stage_mid_channels=[8, 16, 32, 48], stage_out_channels=[32, 64, 96, 128],
              stage_num_blocks=[1, 1, 1, 1], stage_numb_of_layers=[2, 2, 2, 2],
              depths=[1, 1, 1, 1], hidden_sizes=[32, 64, 96, 128])
_TINY_VIT = dict(hidden_size=32, num_hidden_layers=4, num_attention_heads=2,
                 intermediate_size=64)
_SEGFORMER = dict(hidden_sizes=[16, 24, 32, 48], num_attention_heads=[1, 1, 2, 2],
                  depths=[1, 1, 1, 1])
_EFFICIENTNET = dict(width_coefficient=0.25, depth_coefficient=0.5, hidden_dim=320)
_NO_BACKBONE_DOWNLOAD = dict(use_timm_backbone=False, use_pretrained_backbone=False)
_STAGES = ("stage1", "stage2", "stage3", "stage4")


def _config(name: str, **kw):
    import transformers

    return getattr(transformers, name)(**{k: v for k, v in kw.items() if v is not None})


def _hf(cls_name: str, cfg_name: str, backbone: Callable | None = None, **cfg):
    """A builder: `transformers.<cls_name>(<cfg_name>(**cfg))`, with `backbone()` as its
    backbone_config (the library's own, untrained) when given."""
    def build():
        import transformers

        extra = dict(backbone_config=backbone(), **_NO_BACKBONE_DOWNLOAD) if backbone else {}
        if cls_name.endswith("ForImageClassification"):
            extra["num_labels"] = 16  # not 2: see the note above MONAI
        return getattr(transformers, cls_name)(_config(cfg_name, **extra, **cfg))

    return build


def _resnet(stages=_STAGES, cfg="ResNetConfig"):
    return lambda: _config(cfg, embedding_size=16, hidden_sizes=[16, 32, 64, 128],
                           depths=[1, 1, 1, 1], layer_type="basic", out_features=list(stages))


def _detr(cls_name: str, cfg_name: str, stages=("stage4",), **cfg):
    """DETR and its relatives: a ResNet backbone (its BNs become *FrozenBatchNorm2d)."""
    base = dict(d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32,
                num_queries=8)
    return _hf(cls_name, cfg_name, _resnet(stages), **{**base, **cfg})


def _rt_detr(cls_name: str, cfg_name: str, hgnet: bool = False):
    """RT-DETR (v2) on an RT-DETR ResNet, D-FINE on an HGNetV2; frozen backbone BNs."""
    if hgnet:
        backbone = lambda: _config("HGNetV2Config", **_HGNET,  # noqa: E731
                                   out_features=["stage2", "stage3", "stage4"])
        channels = [64, 96, 128]
    else:
        backbone, channels = _resnet(_STAGES[1:], "RTDetrResNetConfig"), [32, 64, 128]
    return _hf(cls_name, cfg_name, backbone, encoder_in_channels=channels,
               encoder_hidden_dim=32, encoder_ffn_dim=32, encoder_attention_heads=2,
               d_model=32, decoder_in_channels=[32, 32, 32], decoder_ffn_dim=32,
               decoder_layers=2, decoder_attention_heads=2, num_queries=8, num_denoising=0,
               decoder_n_points=2)


def _vit(cfg: str, **extra):
    base = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                intermediate_size=64, image_size=64, patch_size=16)
    return lambda: _config(cfg, **{**base, **extra})


_C32, _C64 = (2, 3, 32, 32), (2, 3, 64, 64)
HF: list[ZooModel] = [
    ZooModel("resnet", _hf("ResNetForImageClassification", "ResNetConfig", embedding_size=16,
                           hidden_sizes=[32, 64, 128, 256], depths=[1, 2, 2, 1]),
             _C32, "ResNet/RegNet"),
    ZooModel("regnet", _hf("RegNetForImageClassification", "RegNetConfig", embedding_size=16,
                           hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 2, 1],
                           groups_width=8), _C32, "ResNet/RegNet"),
    ZooModel("mobilenet_v1", _hf("MobileNetV1ForImageClassification", "MobileNetV1Config",
                                 depth_multiplier=0.25, image_size=32,
                                 classifier_dropout_prob=0.1), _C32, "MobileNet/EfficientNet"),
    ZooModel("mobilenet_v2", _hf("MobileNetV2ForImageClassification", "MobileNetV2Config",
                                 depth_multiplier=0.35, image_size=32,
                                 classifier_dropout_prob=0.1), _C32, "MobileNet/EfficientNet"),
    ZooModel("mobilenet_v2_seg", _hf("MobileNetV2ForSemanticSegmentation",
                                     "MobileNetV2Config", depth_multiplier=0.35,
                                     image_size=64), _C64, "MobileNet/EfficientNet"),
    ZooModel("efficientnet", _hf("EfficientNetForImageClassification", "EfficientNetConfig",
                                 image_size=32, **_EFFICIENTNET), _C32,
             "MobileNet/EfficientNet"),
    ZooModel("align_vision", _hf("AlignVisionModel", "AlignVisionConfig", image_size=32,
                                 **_EFFICIENTNET), _C32, "MobileNet/EfficientNet"),
    ZooModel("pp_lcnet", _hf("PPLCNetForImageClassification", "PPLCNetConfig", scale=0.25,
                             class_expand=64), _C32, "MobileNet/EfficientNet"),
    ZooModel("levit", _hf("LevitForImageClassification", "LevitConfig", image_size=64,
                          hidden_sizes=[32, 48, 64], num_attention_heads=[1, 2, 2],
                          depths=[1, 1, 1], key_dim=[8, 8, 8]), _C64, "LeViT/SwiftFormer/CvT"),
    ZooModel("swiftformer", _hf("SwiftFormerForImageClassification", "SwiftFormerConfig",
                                depths=[1, 1, 1, 1], embed_dims=[16, 24, 32, 48]),
             _C32, "LeViT/SwiftFormer/CvT"),
    # CvT indexes its drop-path list by stage: each stage needs more layers than the last.
    ZooModel("cvt", _hf("CvtForImageClassification", "CvtConfig", embed_dim=[16, 32, 48],
                        num_heads=[1, 2, 2], depth=[1, 2, 3]), _C32, "LeViT/SwiftFormer/CvT"),
    ZooModel("mobilevit", _hf("MobileViTForImageClassification", "MobileViTConfig",
                              image_size=64, hidden_sizes=[32, 48, 64],
                              neck_hidden_sizes=[8, 16, 24, 32, 40, 48, 96]), _C64,
             "MobileViT"),
    ZooModel("mobilevitv2", _hf("MobileViTV2ForImageClassification", "MobileViTV2Config",
                                image_size=64, width_multiplier=0.25,
                                n_attn_blocks=[1, 1, 1]), _C64, "MobileViT"),
    ZooModel("textnet", _hf("TextNetForImageClassification", "TextNetConfig",
                            stem_out_channels=16, hidden_sizes=[16, 16, 32, 48, 64],
                            image_size=[32, 32]), _C32, "TextNet/HGNetV2"),
    ZooModel("hgnet_v2", _hf("HGNetV2ForImageClassification", "HGNetV2Config", **_HGNET),
             _C32, "TextNet/HGNetV2"),
    ZooModel("segformer", _hf("SegformerForSemanticSegmentation", "SegformerConfig",
                              decoder_hidden_size=32, **_SEGFORMER), _C64, "SegFormer/GLPN"),
    ZooModel("glpn", _hf("GLPNForDepthEstimation", "GLPNConfig", decoder_hidden_size=16,
                         **_SEGFORMER), _C64, "SegFormer/GLPN"),
    ZooModel("upernet_resnet", _hf("UperNetForSemanticSegmentation", "UperNetConfig",
                                   _resnet(), hidden_size=32, auxiliary_channels=16),
             _C64, "UperNet/BEiT"),
    ZooModel("upernet_convnext", _hf(
        "UperNetForSemanticSegmentation", "UperNetConfig",
        lambda: _config("ConvNextConfig", hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 1, 1],
                        out_features=list(_STAGES)),
        hidden_size=32, auxiliary_channels=16), _C64, "UperNet/BEiT"),
    ZooModel("beit_seg", _hf("BeitForSemanticSegmentation", "BeitConfig", image_size=64,
                             patch_size=16, out_indices=[1, 2, 3, 4], pool_scales=[1, 2],
                             auxiliary_channels=16, **_TINY_VIT), _C64, "UperNet/BEiT"),
    ZooModel("detr", _detr("DetrForObjectDetection", "DetrConfig"), _C64, "DETR"),
    ZooModel("conditional_detr", _detr("ConditionalDetrForObjectDetection",
                                       "ConditionalDetrConfig"), _C64, "DETR"),
    ZooModel("table_transformer", _detr("TableTransformerForObjectDetection",
                                        "TableTransformerConfig"), _C64, "DETR"),
    ZooModel("dab_detr", _detr("DabDetrForObjectDetection", "DabDetrConfig", d_model=None,
                               hidden_size=32), _C64, "DETR"),
    # Two decoder layers: with one, its tied-weights pattern `bbox_embed.(?![0])\d+` matches
    # nothing and the constructor raises. Pure-PyTorch deformable attention (CPU).
    ZooModel("deformable_detr", _detr("DeformableDetrForObjectDetection",
                                      "DeformableDetrConfig", stages=_STAGES[1:],
                                      encoder_n_points=2, decoder_n_points=2, decoder_layers=2,
                                      disable_custom_kernels=True), _C64, "DETR"),
    ZooModel("rt_detr", _rt_detr("RTDetrForObjectDetection", "RTDetrConfig"), _C64, "RT-DETR"),
    ZooModel("rt_detr_v2", _rt_detr("RTDetrV2ForObjectDetection", "RTDetrV2Config"), _C64,
             "RT-DETR"),
    ZooModel("d_fine", _rt_detr("DFineForObjectDetection", "DFineConfig", hgnet=True), _C64,
             "RT-DETR"),
    # DPT's BNs are in its fusion residuals (use_batch_norm_in_fusion_residual).
    ZooModel("dpt", _hf("DPTForDepthEstimation", "DPTConfig", image_size=64,
                        backbone_out_indices=[0, 1, 2, 3], neck_hidden_sizes=[8, 16, 32, 32],
                        fusion_hidden_size=16, use_batch_norm_in_fusion_residual=True,
                        **_TINY_VIT), _C64, "DPT/ViTPose/ViTMatte"),
    ZooModel("vitpose", _hf("VitPoseForPoseEstimation", "VitPoseConfig",
                            _vit("VitPoseBackboneConfig", image_size=[64, 48],
                                 patch_size=[16, 16], out_indices=[2], mlp_ratio=2,
                                 intermediate_size=None),
                            use_simple_decoder=False), (2, 3, 64, 48), "DPT/ViTPose/ViTMatte"),
    ZooModel("vitmatte", _hf("VitMatteForImageMatting", "VitMatteConfig",
                             _vit("VitDetConfig", out_features=["stage2"], num_channels=4),
                             hidden_size=32, convstream_hidden_sizes=[8, 16, 32],
                             fusion_hidden_sizes=[32, 16, 8, 8]), (2, 4, 64, 64),
             "DPT/ViTPose/ViTMatte"),
]

# ---------------------------------------------------------------------------------- MONAI


def _monai(cls_name: str, **kw):
    def build():
        import monai.networks.nets as nets

        return getattr(nets, cls_name)(**kw)

    return build


# Classifiers get 16 classes: the float32 stability check compares error norms, and over the
# 4 numbers of a 2-class output of a batch of 2 that norm is too noisy to hold to 2x.
MONAI: list[ZooModel] = [
    ZooModel("basicunet_2d", _monai("BasicUNet", spatial_dims=2, in_channels=1, out_channels=2,
                                    features=(8, 8, 16, 16, 32, 8), norm="batch"),
             (2, 1, 32, 32), "UNet"),
    ZooModel("basicunet_3d", _monai("BasicUNet", spatial_dims=3, in_channels=1, out_channels=2,
                                    features=(4, 4, 8, 8, 16, 4), norm="batch"),
             (2, 1, 16, 16, 16), "UNet"),
    ZooModel("basicunetpp_2d", _monai("BasicUNetPlusPlus", spatial_dims=2, in_channels=1,
                                      out_channels=2, features=(8, 8, 16, 16, 32, 8),
                                      norm="batch"), (2, 1, 32, 32), "UNet"),
    ZooModel("unet_1d", _monai("UNet", spatial_dims=1, in_channels=1, out_channels=2,
                               channels=(8, 16, 32), strides=(2, 2), num_res_units=1,
                               norm="batch"), (2, 1, 64), "UNet"),
    ZooModel("unet_2d_syncbn", _monai("UNet", spatial_dims=2, in_channels=1, out_channels=2,
                                      channels=(8, 16, 32), strides=(2, 2), num_res_units=1,
                                      norm="syncbatch"), (2, 1, 32, 32), "UNet"),
    ZooModel("unet_2d", _monai("UNet", spatial_dims=2, in_channels=1, out_channels=2,
                               channels=(8, 16, 32), strides=(2, 2), num_res_units=2,
                               norm="batch"), (2, 1, 32, 32), "UNet"),
    ZooModel("unet_3d", _monai("UNet", spatial_dims=3, in_channels=1, out_channels=2,
                               channels=(4, 8, 16), strides=(2, 2), num_res_units=1,
                               norm="batch"), (2, 1, 16, 16, 16), "UNet"),
    ZooModel("attention_unet_2d", _monai("AttentionUnet", spatial_dims=2, in_channels=1,
                                         out_channels=2, channels=(8, 16, 32),
                                         strides=(2, 2)), (2, 1, 32, 32), "UNet"),
    ZooModel("dynunet_3d", _monai("DynUNet", spatial_dims=3, in_channels=1, out_channels=2,
                                  kernel_size=[3, 3, 3], strides=[1, 2, 2],
                                  upsample_kernel_size=[2, 2], filters=[4, 8, 16],
                                  norm_name="batch"), (2, 1, 16, 16, 16), "UNet"),
    ZooModel("segresnet_3d", _monai("SegResNet", spatial_dims=3, in_channels=1, out_channels=2,
                                    init_filters=4, blocks_down=(1, 1, 1), blocks_up=(1, 1),
                                    norm="batch"), (2, 1, 16, 16, 16), "UNet"),
    ZooModel("flexible_unet_2d", _monai("FlexibleUNet", in_channels=1, out_channels=2,
                                        backbone="efficientnet-b0", pretrained=False,
                                        spatial_dims=2, norm="batch"), (2, 1, 64, 64), "UNet"),
    ZooModel("vnet_3d", _monai("VNet", spatial_dims=3, in_channels=1, out_channels=2),
             (2, 1, 16, 16, 16), "UNet"),
    ZooModel("densenet121_2d", _monai("DenseNet121", spatial_dims=2, in_channels=1,
                                      out_channels=16), (2, 1, 32, 32), "classification"),
    ZooModel("densenet_3d", _monai("DenseNet", spatial_dims=3, in_channels=1, out_channels=16,
                                   init_features=8, growth_rate=4, block_config=(2, 2)),
             (2, 1, 16, 16, 16), "classification"),
    ZooModel("resnet18_2d", _monai("resnet18", spatial_dims=2, n_input_channels=1,
                                   num_classes=16), (2, 1, 32, 32), "classification"),
    ZooModel("resnet10_3d", _monai("resnet10", spatial_dims=3, n_input_channels=1,
                                   num_classes=16), (2, 1, 16, 16, 16), "classification"),
    ZooModel("efficientnet_b0_2d", _monai("EfficientNetBN", model_name="efficientnet-b0",
                                          pretrained=False, spatial_dims=2, in_channels=1,
                                          num_classes=16), (2, 1, 32, 32), "classification"),
    ZooModel("efficientnet_b0_3d", _monai("EfficientNetBN", model_name="efficientnet-b0",
                                          pretrained=False, spatial_dims=3, in_channels=1,
                                          num_classes=16), (2, 1, 32, 32, 32), "classification"),
    # EfficientNet-B0's first three stages: two blocks with an identity skip (drop_connect).
    ZooModel("efficientnet_tiny_2d", _monai(
        "EfficientNet", blocks_args_str=["r1_k3_s11_e1_i32_o16_se0.25",
                                         "r2_k3_s22_e6_i16_o24_se0.25",
                                         "r2_k5_s22_e6_i24_o40_se0.25"],
        spatial_dims=2, in_channels=1, num_classes=16, width_coefficient=0.5, image_size=32),
        (2, 1, 32, 32), "classification"),
    ZooModel("seresnet50_2d", _monai("SEResNet50", spatial_dims=2, in_channels=1,
                                     num_classes=16), (2, 1, 32, 32), "classification"),
    ZooModel("highresnet_3d", _monai("HighResNet", spatial_dims=3, in_channels=1,
                                     out_channels=2), (2, 1, 12, 12, 12), "classification"),
]

# Subsets for tests/test_zoo.py (each about 15 s on 2 idle cores): every mechanism of issue
# #18 that loses a pair or breaks a model, and models that fold completely.
HF_QUICK = ["resnet", "mobilenet_v1", "mobilenet_v2", "efficientnet", "align_vision", "levit",
            "cvt", "mobilevit", "hgnet_v2", "segformer", "upernet_convnext", "detr", "rt_detr",
            "vitpose", "vitmatte"]
MONAI_QUICK = ["basicunet_2d", "basicunet_3d", "basicunetpp_2d", "unet_1d", "unet_2d_syncbn",
               "unet_3d", "attention_unet_2d", "dynunet_3d", "segresnet_3d", "densenet_3d",
               "resnet10_3d", "efficientnet_tiny_2d", "highresnet_3d"]
ZOOS = {"hf": HF, "monai": MONAI}
