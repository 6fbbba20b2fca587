"""rollflow's PPO pieces (``algos.ppo``) compute the same numbers as the single-file reference, ``reference/ppo.py``:
advantages over fragments (B, T) against the reference's time-first (T, N) layout, and the minibatch loss with its
gradient for every parameter of one float64 actor-critic. A hand-worked case pins the advantage recursion itself,
so that both sides cannot agree on a wrong formula."""

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from rollflow.algos.ppo import fragment_gae, ppo_loss

REFERENCE = Path(__file__).resolve().parents[2] / "reference" / "ppo.py"
_spec = importlib.util.spec_from_file_location("reference_ppo", REFERENCE)
ref = importlib.util.module_from_spec(_spec)
sys.modules["reference_ppo"] = ref  # its dataclass looks its module up while being defined
_spec.loader.exec_module(ref)


def episode_ends(shape, generator):
    terminated = torch.rand(shape, generator=generator) < 0.1
    truncated = (torch.rand(shape, generator=generator) < 0.05) & ~terminated
    return terminated, terminated | truncated


def test_fragment_gae_equals_the_reference_in_fragment_layout():
    g = torch.Generator().manual_seed(0)
    B, T = 6, 32
    rewards, values, next_values = (torch.randn(B, T, generator=g, dtype=torch.float64) for _ in range(3))
    terminated, ended = episode_ends((B, T), g)
    assert terminated.any() and (ended & ~terminated).any()  # both kinds of end occur
    adv, ret = fragment_gae(rewards, values, next_values, terminated, ended, gamma=0.97, lam=0.9)
    ref_adv, ref_ret = ref.gae(rewards.T, values.T, next_values.T, terminated.T, ended.T, gamma=0.97, lam=0.9)
    torch.testing.assert_close(adv, ref_adv.T, rtol=0, atol=1e-12)
    torch.testing.assert_close(ret, ref_ret.T, rtol=0, atol=1e-12)


def test_fragment_gae_by_hand():
    # One fragment of 4 steps, γ = 0.5, λ = 0.5 (γλ = 0.25): step 1 terminates, step 2 is truncated (bootstrapped
    # from its final observation's value, 4), step 3 is cut by the fragment's end (bootstrapped from 8).
    rewards = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    values = torch.tensor([[1.0, 1.0, 1.0, 1.0]])
    next_values = torch.tensor([[2.0, 9.0, 4.0, 8.0]])  # 9 is after a terminal step: never used
    terminated = torch.tensor([[False, True, False, False]])
    ended = torch.tensor([[False, True, True, False]])
    adv, ret = fragment_gae(rewards, values, next_values, terminated, ended, gamma=0.5, lam=0.5)
    d3 = 4 + 0.5 * 8 - 1  # 7: bootstrapped at the fragment's end
    d2 = 3 + 0.5 * 4 - 1  # 4: truncated, bootstrapped, and the recursion stops
    d1 = 2 + 0 - 1  # 1: terminated, nothing after it
    d0 = 1 + 0.5 * 2 - 1  # 1
    expected = torch.tensor([[d0 + 0.25 * d1, d1, d2, d3]])
    torch.testing.assert_close(adv, expected)
    torch.testing.assert_close(ret, expected + values)


def test_fragment_gae_refuses_mismatched_inputs():
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match=r"equal \(B, T\) shapes.*values \(2, 4\)"):
        fragment_gae(x, torch.zeros(2, 4), x, x.bool(), x.bool())
    with pytest.raises(ValueError, match="terminated but not ended"):
        fragment_gae(x, x, x, torch.ones(2, 3, dtype=torch.bool), x.bool())


@pytest.mark.parametrize("value_clip, entropy_coef", [(0.2, 0.01), (None, 0.0)])
def test_ppo_loss_and_gradients_equal_the_reference(value_clip, entropy_coef):
    torch.manual_seed(0)
    agent = ref.Agent(obs_size=4, actions=3, hidden=16).double()
    g = torch.Generator().manual_seed(1)
    n = 64
    obs = torch.randn(n, 4, generator=g, dtype=torch.float64)
    actions = torch.randint(0, 3, (n,), generator=g)
    with torch.no_grad():  # the behaviour: the same agent before a few updates, perturbed
        old_logprobs, _, old_values = agent.evaluate(obs, actions)
        old_logprobs = old_logprobs + 0.3 * torch.randn(n, generator=g, dtype=torch.float64)  # ratios beyond the clip
        old_values = old_values + 0.5 * torch.randn(n, generator=g, dtype=torch.float64)
    advantages = torch.randn(n, generator=g, dtype=torch.float64)
    returns = old_values + advantages
    cfg = ref.PPOConfig(clip=0.2, value_clip=value_clip, value_coef=0.5, entropy_coef=entropy_coef)

    agent.zero_grad()
    ref_loss = ref.minibatch_loss(agent, obs, actions, old_logprobs, old_values, advantages, returns, cfg)
    ref_loss.backward()
    ref_grads = [p.grad.clone() for p in agent.parameters()]

    agent.zero_grad()
    logprobs, entropy, values = agent.evaluate(obs, actions)
    loss, metrics = ppo_loss(logprobs, old_logprobs, advantages, values, old_values, returns, entropy, clip=0.2,
                             value_clip=value_clip, value_coef=0.5, entropy_coef=entropy_coef)
    loss.backward()

    torch.testing.assert_close(loss, ref_loss, rtol=0, atol=1e-12)
    for p, expected in zip(agent.parameters(), ref_grads):
        torch.testing.assert_close(p.grad, expected, rtol=0, atol=1e-12)
    assert 0.05 < metrics["train/clip_frac"] < 0.95  # the perturbation put some ratios outside the clip, not all


@pytest.mark.slow
def test_the_reference_learns_cartpole():
    # The baseline the simulator recipe is measured against must itself be a good PPO: 475 is CartPole-v1's
    # "solved" return (the episode cap is 500).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        history = ref.train("CartPole-v1", total_steps=120_000, seed=0, log_every=0)
    finally:
        torch.set_num_threads(threads)
    first, last = history[0][2], history[-1][2]
    assert first < 100 and last >= 475, (first, last)


def test_ppo_step_bootstraps_a_truncated_episode_from_its_final_observation():
    from rollflow.algos.ppo import PPOStep
    from rollflow.api import Fragment, SampleRow
    from rollflow.engines.policy import ActorCriticMLP, TorchPolicyTrainer

    g = torch.Generator().manual_seed(0)
    T = 6
    fragment = Fragment(
        observations=torch.randn(T + 1, 4, generator=g), actions=torch.randint(0, 2, (T,), generator=g),
        rewards=torch.randn(T, generator=g), dones=torch.tensor([False, True, False, True, False, False]),
        logprobs=torch.full((T,), -0.7), versions=torch.zeros(T, dtype=torch.long),
        terminated=torch.tensor([False, True, False, False, False, False]),  # step 3 is a time-limit cut
        final_observations=torch.randn(2, 4, generator=g))
    trainer = TorchPolicyTrainer(ActorCriticMLP(4, 2, (8,)), lr=1e-3)
    seen = []
    train_step = trainer.train_step
    trainer.train_step = lambda batch, *a, **k: seen.append(batch) or train_step(batch, *a, **k)
    step = PPOStep(gamma=0.9, lam=0.8, minibatches=1, epochs=1)
    with torch.no_grad():
        values = trainer.model.value(fragment.observations[:-1])
        after = fragment.observations[1:].clone()
        after[[1, 3]] = fragment.final_observations  # the observations before each reset
        next_values = trainer.model.value(after)
        at_reset = trainer.model.value(fragment.observations[4:5]).item()  # the next episode's first observation
    metrics = step([[SampleRow(0, 0, {"task": 0, "fragment": fragment}, {})]], trainer, None)
    expected, _ = fragment_gae(fragment.rewards[None], values[None], next_values[None], fragment.terminated[None],
                               fragment.dones[None], gamma=0.9, lam=0.8)
    [batch] = seen
    torch.testing.assert_close(batch.advantages, expected[0])
    torch.testing.assert_close(batch.returns, expected[0] + values)
    assert trainer.version == 1 and metrics["episode/count"] == 0.0 and "train/policy_loss" in metrics
    assert abs(next_values[3].item() - at_reset) > 1e-4  # bootstrapping from the reset would have given another value


def vtrace_by_sums(mu, pi, rewards, values, next_values, terminated, ended, gamma, rho_bar, c_bar):
    """IMPALA's definition, written as its sum rather than a recursion, for one fragment (T,):
    vs_s = V_s + Σ_{t ≥ s, same episode} γ^{t−s} (Π_{s ≤ i < t} c_i) δ_t."""
    T = len(rewards)
    ratio = (pi - mu).exp()
    rho, c = ratio.clamp(max=rho_bar), ratio.clamp(max=c_bar)
    delta = [rho[t] * (rewards[t] + gamma * (0.0 if terminated[t] else next_values[t]) - values[t]) for t in range(T)]
    vs = []
    for s in range(T):
        total, weight = 0.0, 1.0
        for t in range(s, T):
            total += weight * delta[t]
            if ended[t]:
                break
            weight *= gamma * c[t]
        vs.append(values[s] + total)
    return torch.stack(vs)


@pytest.mark.parametrize("rho_bar, c_bar", [(1.0, 1.0), (2.0, 0.9)])
def test_vtrace_equals_its_definition_as_sums(rho_bar, c_bar):
    from rollflow.algos.ppo import vtrace

    g = torch.Generator().manual_seed(2)
    B, T = 3, 20
    mu, pi = (torch.randn(B, T, generator=g, dtype=torch.float64) * 0.5 for _ in range(2))
    rewards, values, next_values = (torch.randn(B, T, generator=g, dtype=torch.float64) for _ in range(3))
    terminated, ended = episode_ends((B, T), g)
    vs, adv = vtrace(mu, pi, rewards, values, next_values, terminated, ended, 0.9, rho_bar, c_bar)
    for b in range(B):
        expected = vtrace_by_sums(mu[b], pi[b], rewards[b], values[b], next_values[b], terminated[b], ended[b], 0.9,
                                  rho_bar, c_bar)
        torch.testing.assert_close(vs[b], expected, rtol=0, atol=1e-12)
        rho = (pi[b] - mu[b]).exp().clamp(max=rho_bar)
        following = torch.cat([expected[1:], next_values[b, -1:]])
        following = torch.where(ended[b], next_values[b], following)
        live = (~terminated[b]).double()
        torch.testing.assert_close(adv[b], rho * (rewards[b] + 0.9 * live * following - values[b]),
                                   rtol=0, atol=1e-12)


def test_vtrace_on_policy_is_the_lambda_one_gae_return():
    from rollflow.algos.ppo import vtrace

    g = torch.Generator().manual_seed(3)
    B, T = 4, 16
    logp = torch.randn(B, T, generator=g, dtype=torch.float64)
    rewards, values, next_values = (torch.randn(B, T, generator=g, dtype=torch.float64) for _ in range(3))
    terminated, ended = episode_ends((B, T), g)
    vs, _ = vtrace(logp, logp, rewards, values, next_values, terminated, ended, gamma=0.95)
    _, returns = fragment_gae(rewards, values, next_values, terminated, ended, gamma=0.95, lam=1.0)
    torch.testing.assert_close(vs, returns, rtol=0, atol=1e-12)


def test_appo_step_trains_on_vtrace_targets_of_the_current_policy():
    from rollflow.algos.ppo import APPOStep, vtrace
    from rollflow.api import Fragment, SampleRow
    from rollflow.engines.policy import ActorCriticMLP, TorchPolicyTrainer, action_logprobs

    g = torch.Generator().manual_seed(4)
    T = 8
    fragment = Fragment(
        observations=torch.randn(T + 1, 4, generator=g), actions=torch.randint(0, 2, (T,), generator=g),
        rewards=torch.randn(T, generator=g), dones=torch.tensor([False, False, True] + [False] * 5),
        logprobs=torch.log(torch.rand(T, generator=g) * 0.8 + 0.1),  # a behaviour policy other than the trained one
        versions=torch.zeros(T, dtype=torch.long), terminated=torch.tensor([False, False, True] + [False] * 5),
        final_observations=torch.randn(1, 4, generator=g))
    trainer = TorchPolicyTrainer(ActorCriticMLP(4, 2, (8,)), lr=1e-3)
    seen = []
    train_step = trainer.train_step
    trainer.train_step = lambda batch, *a, **k: seen.append(batch) or train_step(batch, *a, **k)
    with torch.no_grad():
        target, _ = action_logprobs(trainer.model, fragment.observations[:-1], fragment.actions)
        values = trainer.model.value(fragment.observations[:-1])
        next_values = trainer.model.value(fragment.next_observations())
    metrics = APPOStep(gamma=0.9, rho_bar=1.0, c_bar=1.0)([[SampleRow(0, 0, {"task": 0, "fragment": fragment}, {})]],
                                                          trainer, None)
    vs, adv = vtrace(fragment.logprobs[None], target[None], fragment.rewards[None], values[None], next_values[None],
                     fragment.terminated[None], fragment.dones[None], gamma=0.9)
    [batch] = seen
    torch.testing.assert_close(batch.returns, vs[0])
    torch.testing.assert_close(batch.advantages, adv[0])
    assert 0.0 < metrics["vtrace/rho_clipped"] < 1.0  # some actions likelier under π than under μ, some less


def test_the_kl_term_holds_the_policy_to_its_frozen_reference_and_its_weight_decays():
    from rollflow.algos.ppo import PPOStep, kl_weight
    from rollflow.api import Fragment, SampleRow
    from rollflow.engines.policy import ActorCriticMLP, TorchPolicyTrainer

    def fragment(seed):
        g = torch.Generator().manual_seed(seed)
        T = 32
        obs = torch.randn(T + 1, 4, generator=g)
        actions = torch.zeros(T, dtype=torch.long)  # always action 0, which the rewards favour strongly
        return Fragment(obs, actions, torch.full((T,), 5.0), torch.zeros(T, dtype=torch.bool),
                        torch.full((T,), -0.69), torch.zeros(T, dtype=torch.long))

    def rows():
        frags = [fragment(s) for s in range(4)]
        return [[SampleRow(i, i, {"fragment": f}, {})] for i, f in enumerate(frags)]

    def drift(kl_coef):
        trainer = TorchPolicyTrainer(ActorCriticMLP(4, 2, (16,)), lr=0.02)
        trainer.freeze_reference()
        step = PPOStep(kl_coef=kl_coef, minibatches=1, epochs=4, clip=10.0)
        for _ in range(6):
            step(rows(), trainer, None)
        obs = torch.randn(256, 4, generator=torch.Generator().manual_seed(9))
        with torch.no_grad():
            p, q = trainer.model(obs).log_softmax(-1), trainer.reference(obs).log_softmax(-1)
        return (p.exp() * (p - q)).sum(-1).mean().item()  # exact KL(π ‖ π_ref) over the actions

    free, held = drift(0.0), drift(50.0)
    assert free > 0.1 and held < free / 5, (free, held)
    step = PPOStep(kl_coef=0.2, kl_decay_steps=10)
    trainer = TorchPolicyTrainer(ActorCriticMLP(4, 2, (16,)), lr=0.02)
    trainer._version = 7
    trainer.set_lr(0.02)  # RL starts at version 7: the decay counts from there
    trainer._version = 12
    assert kl_weight(step, trainer) == pytest.approx(0.1)
