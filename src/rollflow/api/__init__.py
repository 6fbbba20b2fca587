"""Contracts only: the sample schema and the small interfaces every other layer implements or consumes."""

from rollflow.api.engines import (
    CriticEngine,
    InferenceEngine,
    LossFn,
    LossOutput,
    PolicyEngine,
    PolicyTrainEngine,
    ScoringEngine,
    StepBatch,
    StepLossFn,
    TrainBatch,
    TrainEngine,
    TrainStep,
)
from rollflow.api.sample import (
    Column,
    Generation,
    Problem,
    RewardCell,
    RewardResult,
    SampleRow,
    SamplingParams,
    Status,
)
from rollflow.api.task import RewardFn, Task
from rollflow.api.trajectory import Fragment, Trajectory, TrajectoryBuilder, TrajectoryCell, Turn
from rollflow.api.weights import VersionedWeights, WeightChecksumError, WeightTransport, checksum
from rollflow.api.workflow import (
    EngineClient,
    EnvStep,
    EpisodeContext,
    InfraError,
    Reject,
    RolloutWorkflow,
    TextEnv,
)

__all__ = [
    "Column", "CriticEngine", "EngineClient", "EnvStep", "EpisodeContext", "Fragment", "Generation", "InferenceEngine",
    "InfraError", "LossFn", "LossOutput", "PolicyEngine", "PolicyTrainEngine", "Problem", "Reject", "RewardCell", "RewardFn",
    "RewardResult", "RolloutWorkflow", "SampleRow", "SamplingParams", "ScoringEngine", "Status", "StepBatch", "StepLossFn", "Task", "TextEnv",
    "TrainBatch", "TrainEngine", "TrainStep", "Trajectory", "TrajectoryBuilder", "TrajectoryCell", "Turn", "VersionedWeights",
    "WeightChecksumError", "WeightTransport", "checksum",
]
