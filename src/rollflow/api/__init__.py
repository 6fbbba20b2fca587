"""Contracts only: the sample schema and the small interfaces every other layer implements or consumes."""

from rollflow.api.engines import (
    CriticEngine,
    DecodeSession,
    InferenceEngine,
    LossFn,
    LossOutput,
    PolicyEngine,
    PolicyTrainEngine,
    ScoringEngine,
    SessionEngine,
    StepBatch,
    StepLossFn,
    TrainBatch,
    TrainEngine,
    TrainStep,
)
from rollflow.api.env import Env, StepResult, SyncEnv
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
from rollflow.api.task import AgentTask, RewardFn, Task
from rollflow.api.trajectory import Fragment, Trajectory, TrajectoryBuilder, TrajectoryCell, Turn
from rollflow.api.weights import VersionedWeights, WeightChecksumError, WeightTransport, checksum
from rollflow.api.workflow import (
    BatchWorkflow,
    EngineClient,
    EpisodeContext,
    InfraError,
    Reject,
    RolloutWorkflow,
)

__all__ = [
    "AgentTask", "BatchWorkflow", "Column", "CriticEngine", "DecodeSession", "EngineClient", "Env", "EpisodeContext", "Fragment", "Generation", "InferenceEngine",
    "InfraError", "LossFn", "LossOutput", "PolicyEngine", "PolicyTrainEngine", "Problem", "Reject", "RewardCell", "RewardFn",
    "RewardResult", "RolloutWorkflow", "SampleRow", "SamplingParams", "ScoringEngine", "SessionEngine", "Status", "StepBatch", "StepLossFn", "StepResult", "SyncEnv", "Task",
    "TrainBatch", "TrainEngine", "TrainStep", "Trajectory", "TrajectoryBuilder", "TrajectoryCell", "Turn", "VersionedWeights",
    "WeightChecksumError", "WeightTransport", "checksum",
]
