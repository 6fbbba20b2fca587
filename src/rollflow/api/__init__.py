"""Contracts only: the sample schema and the small interfaces every other layer implements or consumes."""

from rollflow.api.engines import CriticEngine, InferenceEngine, LossFn, LossOutput, ScoringEngine, TrainBatch, TrainEngine
from rollflow.api.sample import (
    COLUMNS,
    GENERATION,
    NEEDS,
    PROMPT,
    REFERENCE,
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
    "COLUMNS", "GENERATION", "NEEDS", "PROMPT", "REFERENCE", "REWARD",
    "CriticEngine", "Generation", "GenerationCell", "InferenceEngine", "LossFn", "LossOutput", "Problem", "PromptCell", "RewardCell",
    "RewardFn", "RewardResult", "SampleRow", "SamplingParams", "ScoringEngine", "Status", "Task", "TrainBatch", "TrainEngine",
    "VersionedWeights", "WeightChecksumError", "WeightTransport", "checksum",
]
