"""rollflow: reinforcement-learning post-training of language models and agent policies.

The public surface — everything a user script needs::

    import rollflow
    config = rollflow.load_config(overrides=["train.steps=50"])
    result = rollflow.train(config, reward_fn=my_reward)

``reward_fn`` is any callable ``(problem, response) -> float | RewardResult``: defined in the script, in a module
beside it, anywhere this process can import it from; on Ray it is pickled to the reward workers, which are given
this process's import path. It is called once before the model is built, so a broken one fails at once.
"""

from rollflow.api import Problem, RewardResult, Status, Task
from rollflow.config import Config, ConfigError, load_config
from rollflow.recipes import RunResult, train

__all__ = ["Config", "ConfigError", "Problem", "RewardResult", "RunResult", "Status", "Task", "load_config", "train"]
__version__ = "0.1.0"
