"""The one training harness every model goes through."""

from seqzoo.train.loop import TrainResult, train

__all__ = ["TrainResult", "train"]
