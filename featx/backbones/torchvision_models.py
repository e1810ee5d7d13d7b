"""torchvision's models in the registry: how each family reaches its last map and its
penultimate vector, and one :class:`~featx.backbones.registry.BackboneSpec` per model."""
from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torchvision import models

from featx.backbones.registry import BackboneSpec, register_backbone

__all__: list[str] = []  # importing the module registers its models

# bf16 vs fp32 relative error of each model's features (penultimate and pool1, the larger),
# by `python -m benchmarks.bf16_error` on 16 pneumoniamnist images at 224 px, torch 2.14.1,
# an AVX512-BF16 CPU (BENCHMARKS.md, "bf16 and the features"). ImageNet weights where they
# are offline (mobilenet_v2: 2.2e-1; the same model with random init: 1.7e-2), random init
# for the others, whose trained weights may move more: the bound is 1e-2
# (featx.backbones.registry.BF16_MAX_ERROR), and `--precision auto` stays fp32 above it.
_BF16_ERROR = {
    "densenet121": (4.9e-3, "random"), "efficientnet_b0": (1.1e-2, "random"),
    "googlenet": (5.6e-3, "random"), "mobilenet_v2": (2.2e-1, "imagenet"),
    "mobilenet_v3_large": (7.1e-3, "random"), "resnet101": (3.9e-3, "random"),
    "resnet18": (3.3e-3, "random"), "resnet34": (4.0e-3, "random"),
    "resnet50": (4.5e-3, "random"), "shufflenet_v2_x1_0": (7.1e-3, "random"),
    "shufflenet_v2_x2_0": (3.6e-3, "random"), "vgg16": (7.9e-3, "random"),
    "vgg16_bn": (7.9e-3, "random"),
}


def _register(spec: BackboneSpec) -> None:
    error, weights = _BF16_ERROR.get(spec.name, (None, ""))
    register_backbone(dataclasses.replace(spec, bf16_error=error, bf16_measured_with=weights))



# --- how each family reaches its features -------------------------------------------------

def _resnet_features(m, x):
    x = m.maxpool(m.relu(m.bn1(m.conv1(x))))
    return m.layer4(m.layer3(m.layer2(m.layer1(x))))


def _resnet_head(m, f):
    return torch.flatten(m.avgpool(f), 1)


def _sequential_features(m, x):
    return m.features(x)


def _vgg_head(m, f):
    # classifier[:-1] = Linear, ReLU, Dropout, Linear, ReLU, Dropout -> 4096
    return m.classifier[:-1](torch.flatten(m.avgpool(f), 1))


def _avgpool_classifier_head(m, f):
    # MobileNetV3 / EfficientNet: avgpool, flatten, classifier[:-1]
    return m.classifier[:-1](torch.flatten(m.avgpool(f), 1))


def _mobilenet_v2_head(m, f):
    return m.classifier[:-1](torch.flatten(F.adaptive_avg_pool2d(f, (1, 1)), 1))


def _densenet_features(m, x):
    # DenseNet applies a ReLU after `features` and pools that: it is the spatial map.
    return F.relu(m.features(x))


def _densenet_head(m, f):
    return torch.flatten(F.adaptive_avg_pool2d(f, (1, 1)), 1)


_GOOGLENET_TRUNK = ("conv1", "maxpool1", "conv2", "conv3", "maxpool2", "inception3a",
                    "inception3b", "maxpool3", "inception4a", "inception4b", "inception4c",
                    "inception4d", "inception4e", "maxpool4", "inception5a", "inception5b")


def _googlenet_features(m, x):
    x = m._transform_input(x)
    for name in _GOOGLENET_TRUNK:
        x = getattr(m, name)(x)
    return x


def _googlenet_head(m, f):
    return m.dropout(torch.flatten(m.avgpool(f), 1))


_SHUFFLENET_TRUNK = ("conv1", "maxpool", "stage2", "stage3", "stage4", "conv5")


def _shufflenet_features(m, x):
    for name in _SHUFFLENET_TRUNK:
        x = getattr(m, name)(x)
    return x


def _shufflenet_head(m, f):
    return f.mean([2, 3])


_RESNET_STAGES = ("conv1", "bn1", "layer1", "layer2", "layer3", "layer4")


def _indexed(prefix: str, n: int) -> tuple[str, ...]:
    return tuple(f"{prefix}.{i}" for i in range(n))


def _indexed_at(prefix: str, at) -> tuple[str, ...]:
    return tuple(f"{prefix}.{i}" for i in at)


for _name, _builder, _enum, _dim in [
    ("resnet18", models.resnet18, models.ResNet18_Weights, 512),
    ("resnet34", models.resnet34, models.ResNet34_Weights, 512),
    ("resnet50", models.resnet50, models.ResNet50_Weights, 2048),
    ("resnet101", models.resnet101, models.ResNet101_Weights, 2048),
]:
    _register(BackboneSpec(_name, _builder, _enum, _dim, _dim, "fc",
                           _resnet_features, _resnet_head, _RESNET_STAGES,
                           layer_stages=("layer1", "layer2", "layer3", "layer4"),
                           map_layer="layer4", penultimate_alias="pool1"))

_register(BackboneSpec("vgg16", models.vgg16, models.VGG16_Weights, 4096, 512, "classifier.6",
                       _sequential_features, _vgg_head, _indexed("features", 31),
                       # the five max-pooled blocks; features.30 is the last map
                       layer_stages=_indexed_at("features", (4, 9, 16, 23, 30)),
                       map_layer="features.30"))
_register(BackboneSpec("vgg16_bn", models.vgg16_bn, models.VGG16_BN_Weights, 4096, 512,
                       "classifier.6", _sequential_features, _vgg_head, _indexed("features", 44),
                       layer_stages=_indexed_at("features", (6, 13, 23, 33, 43)),
                       map_layer="features.43"))
_register(BackboneSpec("googlenet", models.googlenet, models.GoogLeNet_Weights, 1024, 1024, "fc",
                       _googlenet_features, _googlenet_head, _GOOGLENET_TRUNK,
                       build_kwargs={"aux_logits": False, "transform_input": True,
                                     "init_weights": True},
                       ignore_keys=("aux1.", "aux2."),
                       layer_stages=("maxpool2", "inception3b", "inception4e", "inception5b"),
                       map_layer="inception5b", penultimate_alias="pool1"))
for _name, _builder, _enum in [
    ("shufflenet_v2_x1_0", models.shufflenet_v2_x1_0, models.ShuffleNet_V2_X1_0_Weights),
    ("shufflenet_v2_x2_0", models.shufflenet_v2_x2_0, models.ShuffleNet_V2_X2_0_Weights),
]:
    _dim = 1024 if _name.endswith("1_0") else 2048
    _register(BackboneSpec(_name, _builder, _enum, _dim, _dim, "fc", _shufflenet_features,
                           _shufflenet_head, _SHUFFLENET_TRUNK,
                           layer_stages=("stage2", "stage3", "stage4", "conv5"),
                           map_layer="conv5", penultimate_alias="pool1"))
_register(BackboneSpec("mobilenet_v2", models.mobilenet_v2, models.MobileNet_V2_Weights, 1280,
                       1280, "classifier.1", _sequential_features, _mobilenet_v2_head,
                       _indexed("features", 19),
                       # the last block at each resolution: 112, 56, 28, 14, 7 px at 224
                       layer_stages=_indexed_at("features", (1, 3, 6, 13, 18)),
                       map_layer="features.18", penultimate_alias="pool1"))
_register(BackboneSpec("mobilenet_v3_large", models.mobilenet_v3_large,
                       models.MobileNet_V3_Large_Weights, 1280, 960, "classifier.3",
                       _sequential_features, _avgpool_classifier_head, _indexed("features", 17),
                       layer_stages=_indexed_at("features", (1, 3, 6, 12, 16)),
                       map_layer="features.16"))
_register(BackboneSpec("densenet121", models.densenet121, models.DenseNet121_Weights, 1024, 1024,
                       "classifier", _densenet_features, _densenet_head,
                       ("features.conv0", "features.norm0", "features.relu0", "features.pool0",
                        "features.denseblock1", "features.transition1", "features.denseblock2",
                        "features.transition2", "features.denseblock3", "features.transition3",
                        "features.denseblock4", "features.norm5"),
                       # the map is relu(norm5(denseblock4)): no stage output is the map itself
                       layer_stages=tuple(f"features.denseblock{i}" for i in range(1, 5)),
                       penultimate_alias="pool1"))
_register(BackboneSpec("efficientnet_b0", models.efficientnet_b0, models.EfficientNet_B0_Weights,
                       1280, 1280, "classifier.1", _sequential_features, _avgpool_classifier_head,
                       _indexed("features", 9),
                       layer_stages=_indexed_at("features", (1, 2, 3, 5, 8)),
                       map_layer="features.8", penultimate_alias="pool1"))
