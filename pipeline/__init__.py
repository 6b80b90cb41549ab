"""PyTorch image classifiers trained, tracked and compared with MLflow."""

__version__ = "0.1.0"
