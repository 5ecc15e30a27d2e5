"""mipp: Mutual Information Preserving Pruning of PyTorch models.

    import mipp
    data = mipp.load_dataset("digits")
    model = mipp.build_model("mlp", data.input_shape, data.num_classes, widths=[64, 32])
    mipp.train(model, data, mipp.TrainConfig(epochs=20))
    result = mipp.prune(model, data, mipp.PruneConfig(tol=0.1))
    result.save("pruned")
    predictor = mipp.load_predictor("pruned")   # takes raw inputs; predictor.predict(x_raw)

Names are imported lazily, so that `import mipp.npz` or `mipp.config` (which the API process
uses) does not load torch.
"""

from importlib import import_module

_EXPORTS = {
    "export_onnx": "mipp.artifacts", "load_model_dir": "mipp.artifacts",
    "save_dense_dir": "mipp.artifacts", "load_predictor": "mipp.artifacts",
    "Predictor": "mipp.artifacts", "CodeSpec": "mipp.custom", "build_code_model": "mipp.custom",
    "Preprocessing": "mipp.preprocessing",
    "PruneConfig": "mipp.config", "ReconstructorConfig": "mipp.config", "TrainConfig": "mipp.config",
    "Dataset": "mipp.data", "load_dataset": "mipp.data", "load_npz": "mipp.data",
    "Cancelled": "mipp.errors", "ConfigError": "mipp.errors", "DataError": "mipp.errors",
    "MippError": "mipp.errors", "ModelError": "mipp.errors",
    "PruneResult": "mipp.pipeline", "prune": "mipp.pipeline",
    "method_names": "mipp.method_registry", "register_method": "mipp.method_registry",
    "evaluate": "mipp.training", "train": "mipp.training",
    "ModelSpec": "mipp.zoo", "build_model": "mipp.zoo", "load_weights": "mipp.zoo",
}
__all__ = sorted(_EXPORTS)
__version__ = "0.1.0"


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'mipp' has no attribute {name!r}")
