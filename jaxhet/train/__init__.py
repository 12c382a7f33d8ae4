"""Training: configuration, the loop on one device or an HSPMD plan, and Orbax checkpoints."""

from jaxhet.train.config import OptimConfig, TrainConfig
from jaxhet.train.loop import TrainedRun, TrainResult, load_trained, train

__all__ = ["OptimConfig", "TrainConfig", "TrainResult", "TrainedRun", "load_trained", "train"]
