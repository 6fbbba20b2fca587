"""rollflow: reinforcement-learning post-training of language models and agent policies.

The public surface — everything a user script needs::

    import rollflow
    config = rollflow.load_config(overrides=["train.steps=50"])
    result = rollflow.train(config, reward_fn=my_reward)
"""

from rollflow.api import Problem, RewardResult, Status, Task
from rollflow.config import Config, ConfigError, load_config
from rollflow.recipes import RunResult, train

__all__ = ["Config", "ConfigError", "Problem", "RewardResult", "RunResult", "Status", "Task", "load_config", "train"]
__version__ = "0.1.0"
