"""Backbones: the model registry, its torchvision and timm sources, weights, the frozen
inference form.

Read in this order: :mod:`~featx.backbones.registry` (one entry per model, the lookups),
:mod:`~featx.backbones.torchvision_models` and :mod:`~featx.backbones.timm_models` (the
sources that fill it; timm's weights files in :mod:`~featx.backbones.timm_weights`), :mod:`~featx.backbones.weights` (which weights a model gets),
:mod:`~featx.backbones.build` (resolve, build, load, wrap),
:mod:`~featx.backbones.layers` (intermediate layers, all from one forward) and
:mod:`~featx.backbones.frozen` (the fast eval form extraction and predict run), whose forward
runs in torch or, exported once, in ONNX Runtime / OpenVINO (:mod:`~featx.backbones.engines`).
"""
from featx.backbones import torchvision_models  # noqa: F401  (registers its models)
from featx.backbones.build import (FeatureModel, RunSetup, backbone_provenance,
                                   backbone_transform, build_backbone, pool_notes, resolve_run)
from featx.backbones.engines import (EngineError, engine_version, exported_model,
                                     installed_engines, resolve_engine)
from featx.backbones.frozen import (FrozenModel, check_engine_serves, compile_model, feature_dims,
                                    forward_batch,
                                    frozen_model, prepare_for_inference)
from featx.backbones.layers import (LayerFeatures, LayerPlan, layer_notes, layer_plan,
                                    list_layers, parse_layers)
from featx.backbones.registry import (BF16_MAX_ERROR, BackboneSpec, UnknownModelError,
                                      WeightsError, bf16_keeps_features, get_backbone, is_timm,
                                      list_backbones, register_backbone, register_source)
from featx.backbones.state_dicts import check_state_dict, load_state_dict
from featx.backbones.timm_models import TimmSpec, list_timm_models, timm_spec, timm_transform
from featx.backbones.timm_weights import (build_timm_model, load_timm_state, timm_cached_names,
                                          timm_pretrained_file)
from featx.backbones.weights import (ResolvedWeights, describe_weights_availability,
                                     hub_checkpoint_path, import_weights, resolve_weights,
                                     weights_transform_source)

__all__ = ["BF16_MAX_ERROR", "BackboneSpec", "EngineError", "FeatureModel", "FrozenModel",
           "LayerFeatures", "LayerPlan", "layer_notes", "layer_plan", "list_layers", "parse_layers",
           "ResolvedWeights", "RunSetup", "TimmSpec", "UnknownModelError", "WeightsError",
           "backbone_provenance", "backbone_transform", "bf16_keeps_features", "build_backbone",
           "build_timm_model", "check_state_dict", "check_engine_serves", "compile_model",
           "describe_weights_availability", "engine_version", "exported_model",
           "feature_dims", "forward_batch", "frozen_model", "get_backbone",
           "hub_checkpoint_path", "import_weights", "installed_engines", "is_timm",
           "list_backbones", "list_timm_models", "load_state_dict", "load_timm_state",
           "pool_notes", "prepare_for_inference", "register_backbone", "register_source",
           "resolve_engine", "resolve_run", "resolve_weights", "timm_cached_names",
           "timm_pretrained_file", "timm_spec", "timm_transform", "weights_transform_source"]
