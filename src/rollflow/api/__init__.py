"""Contracts only: the sample schema and the small interfaces every other layer implements or consumes."""

from rollflow.api.engines import InferenceEngine, LossFn, LossOutput, TrainBatch, TrainEngine
from rollflow.api.sample import (
    COLUMNS,
    GENERATION,
    PROMPT,
    REWARD,
    Generation,
    GenerationCell,
    Problem,
    PromptCell,
    RewardCell,
    RewardResult,
    SampleRow,
    SamplingParams,
    Status,
)
from rollflow.api.task import RewardFn, Task
from rollflow.api.weights import VersionedWeights, WeightChecksumError, WeightTransport, checksum

__all__ = [
    "COLUMNS", "GENERATION", "PROMPT", "REWARD",
    "Generation", "GenerationCell", "InferenceEngine", "LossFn", "LossOutput", "Problem", "PromptCell", "RewardCell",
    "RewardFn", "RewardResult", "SampleRow", "SamplingParams", "Status", "Task", "TrainBatch", "TrainEngine",
    "VersionedWeights", "WeightChecksumError", "WeightTransport", "checksum",
]
