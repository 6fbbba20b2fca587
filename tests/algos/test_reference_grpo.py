"""rollflow's GRPO step computes the same numbers as the single-file reference, ``reference/grpo.py``.

The framework path is the trainer's own, end to end: store rows (trajectory and reward cells) →
``TrainerWorker.train`` → ``algos.policy_step.TextPolicyStep`` (batch from the trajectories, group advantages,
masking) → ``TorchTrainEngine.train_step`` → ``token_logprobs`` → the policy loss. Every group also holds a row
hit by an infrastructure fault, which the reference never sees: it must take no part in any group statistic or in
the loss. Both paths run on one float64 model, so any difference beyond rounding (a shifted column, a mask leaking
padding or the faulty row, another aggregation) shows up far above the tolerance.
"""

import importlib.util
import runpy
from pathlib import Path

import pytest
import torch

from rollflow.algos import ADVANTAGES, policy_loss_fn
from rollflow.algos.policy_step import Algorithm, TextPolicyStep
from rollflow.api import RewardCell, RewardResult, SampleRow, Status, Trajectory, TrajectoryCell
from rollflow.engines.models import TinyModelSpec, char_tokenizer, tiny_model
from rollflow.engines.torch_train import TorchTrainEngine
from rollflow.runtime.roles import TrainerWorker
from rollflow.runtime.weights import InlineWeightTransport

REFERENCE = Path(__file__).resolve().parents[2] / "reference" / "grpo.py"
_spec = importlib.util.spec_from_file_location("reference_grpo", REFERENCE)
ref = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ref)

TOKENIZER = char_tokenizer("0123456789+=")
SPEC = TinyModelSpec(hidden_size=16, layers=1, heads=2, intermediate_size=32, max_positions=64)
G, N = 3, 4  # groups, responses per group
ATOL = 1e-6  # float64 on both paths: the measured gap is ~1e-16


def make_model():
    # train() as TorchTrainEngine does; the tiny Qwen2 has no dropout, so both paths see the same function
    return tiny_model(SPEC, TOKENIZER, seed=0).double().train()


def make_data(model, seed=0):
    """Groups of N rows sharing a prompt; prompt and response lengths vary so rows carry padding. Group 0's rewards
    are all equal (advantage 0). π_old is the model's own log-probs plus noise, so some ratios leave the clip range."""
    gen = torch.Generator().manual_seed(seed)

    def tokens(lo, hi):  # ids of the alphabet's characters, never pad/bos/eos
        length = int(torch.randint(lo, hi, (), generator=gen))
        return torch.randint(3, len(TOKENIZER), (length,), generator=gen).tolist()

    group_prompts = [[TOKENIZER.bos_token_id, *tokens(1, 6)] for _ in range(G)]
    prompts = [p for p in group_prompts for _ in range(N)]  # rows g·N .. g·N + N − 1 share prompt g
    responses = [tokens(1, 9) for _ in range(G * N)]
    rewards = [1.0] * N + torch.rand(G * N - N, generator=gen, dtype=torch.float64).tolist()

    ids, attn, resp = ref.right_pad(prompts, responses, TOKENIZER.pad_token_id)
    with torch.no_grad():
        current = ref.sequence_logprobs(model, ids, attn)
    old = [(current[i][resp[i]] + 0.3 * torch.randn(len(responses[i]), generator=gen, dtype=torch.float64)).tolist()
           for i in range(G * N)]
    return prompts, responses, rewards, old


def trajectory(prompt, response, old):
    return Trajectory(prompt + response, [0] * len(prompt) + [1] * len(response), [0.0] * len(prompt) + list(old),
                      [-1] * len(prompt) + [0] * len(response), [], "")


def row(uid, group, prompt, response, old, reward, status=Status.OK):
    cells = {"trajectory": TrajectoryCell.of(trajectory(prompt, response, old)),
             "reward": RewardCell(RewardResult(reward, status=status), 0.0)}
    return SampleRow(uid, group, cells, {})


class Recorded:
    """The loss function, keeping what it returned."""

    def __init__(self, loss_fn) -> None:
        self.loss_fn, self.outputs = loss_fn, []

    def __call__(self, logprobs, entropy, batch):
        self.outputs.append(self.loss_fn(logprobs, entropy, batch))
        return self.outputs[-1]


def framework_step(model, prompts, responses, rewards, old, clip_low, clip_high, temperature):
    """One step on the trainer's real path; returns the loss it computed and the gradients it stepped on.

    Group g gets a faulty row (random tokens, reward 7, status infra_error) at position g. The engine steps with lr 0
    and no effective clipping, so the model is unchanged and each parameter's ``.grad`` is the loss's gradient."""
    gen = torch.Generator().manual_seed(1)
    groups, uid = [], 0
    for g in range(G):
        members = [row(uid + k, g, prompts[i], responses[i], old[i], rewards[i]) for k, i in enumerate(range(g * N, g * N + N))]
        junk = torch.randint(3, len(TOKENIZER), (5,), generator=gen).tolist()
        members.insert(g, row(uid + N, g, prompts[g * N], junk, [-9.0] * 5, 7.0, Status.INFRA_ERROR))
        groups.append(members)
        uid += N + 1
    loss = Recorded(policy_loss_fn("ppo_clip", "token-mean", clip_low=clip_low, clip_high=clip_high))
    engine = TorchTrainEngine(model, lr=0.0, grad_clip=1e9, temperature=temperature)
    trainer = TrainerWorker(engine, InlineWeightTransport(),
                            TextPolicyStep(Algorithm(ADVANTAGES.get("grpo"), loss), TOKENIZER.pad_token_id))
    # Under a float64 default every float column of the step's batch is float64, so the comparison measures the
    # computation and not the inputs' rounding to float32 (which alone would leave a ~1e-8 gap).
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        result = trainer.train(groups)
    finally:
        torch.set_default_dtype(before)
    [out] = loss.outputs
    assert result.version == 1
    return out, {name: p.grad.clone() for name, p in model.named_parameters()}


def grads(model, loss):
    model.zero_grad(set_to_none=True)
    loss.backward()
    return {name: p.grad.clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize(
    "clip_low, clip_high, temperature",
    [(0.2, 0.2, 1.0), (0.2, 0.28, 1.0), (0.2, 0.28, 0.7)],
    ids=["symmetric", "clip-higher", "temperature"],
)
def test_framework_grpo_step_matches_reference(clip_low, clip_high, temperature):
    model = make_model()
    prompts, responses, rewards, old = make_data(model)
    lengths = [len(p) + len(r) for p, r in zip(prompts, responses)]
    assert min(lengths) < max(lengths), "rows must differ in length, or padding is not exercised"

    expected = ref.grpo_loss(model, prompts, responses, rewards, N, old, clip_low=clip_low, clip_high=clip_high,
                             temperature=temperature, pad_id=TOKENIZER.pad_token_id)
    expected_grads = grads(model, expected)
    out, actual_grads = framework_step(model, prompts, responses, rewards, old, clip_low, clip_high, temperature)

    assert out.loss.dtype == expected.dtype == torch.float64
    assert out.metrics["clip_frac"] > 0, "no token was clipped: the test would not exercise the clip"
    gap = abs(out.loss.item() - expected.item())
    assert gap < ATOL, f"loss: framework {out.loss.item()} vs reference {expected.item()} (gap {gap:.1e})"
    assert any(g.abs().max() > 0 for g in expected_grads.values())
    for name, g in expected_grads.items():
        torch.testing.assert_close(actual_grads[name], g, atol=ATOL, rtol=0, msg=lambda m, name=name: f"grad of {name}: {m}")


@pytest.mark.parametrize("shape", [(5, 4), (3, 1)])
def test_reference_group_advantages_match_registered_grpo(shape):
    rewards = torch.rand(shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    rewards[0] = 0.5  # a group whose rewards are all equal: advantage 0
    expected = ref.group_advantages(rewards)
    torch.testing.assert_close(ADVANTAGES.get("grpo")(rewards), expected, atol=1e-12, rtol=0)
    assert torch.equal(expected[0], torch.zeros(shape[1], dtype=torch.float64))


def test_reference_demo_runs(capsys):
    runpy.run_path(str(REFERENCE), run_name="__main__")
    assert "GRPO loss" in capsys.readouterr().out
