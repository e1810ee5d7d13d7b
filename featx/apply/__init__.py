"""Applying a result to new images: the predictor a result rebuilds
(:mod:`~featx.apply.predictor`), predictions for folders and manifests
(:mod:`~featx.apply.predict`), and the export to one TorchScript file
(:mod:`~featx.apply.export`)."""
from featx.apply.export import (
                                ExportedClassifier,
                                HeadLayers,
                                UnsupportedHeadError,
                                export_result,
                                head_module,
                                read_export_info,
)
from featx.apply.predict import (
                                NewImages,
                                PredictRun,
                                find_images,
                                predict,
                                predict_batches,
                                write_predictions,
)
from featx.apply.predictor import Predictor, ResultMismatchError, feature_width, load_predictor

__all__ = ["ExportedClassifier", "HeadLayers", "NewImages", "PredictRun", "Predictor",
           "ResultMismatchError", "UnsupportedHeadError", "export_result", "feature_width",
           "find_images", "head_module", "load_predictor", "predict", "predict_batches",
           "read_export_info", "write_predictions"]
