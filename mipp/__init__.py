"""mipp: Mutual Information Preserving Pruning of PyTorch models.

    import mipp
    data = mipp.load_dataset("digits")
    model = mipp.build_model("mlp", data.input_shape, data.num_classes, widths=[64, 32])
    mipp.train(model, data, mipp.TrainConfig(epochs=20))
    result = mipp.prune(model, data, mipp.PruneConfig(tol=0.1))
    result.save("pruned")
"""

from mipp.artifacts import export_onnx, load_model_dir, save_dense_dir
from mipp.config import PruneConfig, ReconstructorConfig, TrainConfig
from mipp.errors import Cancelled, ConfigError, DataError, MippError, ModelError
from mipp.pipeline import PruneResult, prune
from mipp.training import evaluate, train
from mipp.zoo import ModelSpec, build_model, load_weights

__all__ = [
    "Cancelled", "ConfigError", "DataError", "MippError", "ModelError", "ModelSpec",
    "PruneConfig", "PruneResult", "ReconstructorConfig", "TrainConfig", "build_model",
    "evaluate", "export_onnx", "load_model_dir", "load_weights",
    "prune", "save_dense_dir", "train",
]
__version__ = "0.1.0"
