"""One GRPO training step in plain PyTorch: the single-file reference that rollflow's numbers are tested against.

GRPO (Shao et al. 2024, "DeepSeekMath", §4.1) samples a group of n responses o_1..o_n per prompt q, scores each with
one reward r_i, and maximises the PPO clipped surrogate with a group-relative advantage in place of a critic:

    Â_i    = (r_i − mean(r_1..r_n)) / std(r_1..r_n)                 same value for every token t of o_i
    ρ_i,t  = π_θ(o_i,t | q, o_i,<t) / π_old(o_i,t | q, o_i,<t)
    J(θ)   = E[ min(ρ_i,t · Â_i, clip(ρ_i,t, 1 − ε_low, 1 + ε_high) · Â_i) ]        loss = −J(θ)

Read top to bottom: pad → log-probs → advantages → surrogate → aggregate. No rollflow imports, on purpose: this file
is what ``tests/algos/test_reference_grpo.py`` holds the framework's collate → token_logprobs → policy_loss_fn path to.

Where this departs from the paper, as rollflow does:
  * No KL term. The paper subtracts β·KL(π_θ ‖ π_ref) inside the objective; in rollflow the KL to a reference
    policy is optional and off by default, so the reference leaves it out.
  * Token-mean aggregation: the loss is the mean over every response token of the batch (DAPO, Yu et al. 2025).
    The paper averages each response's tokens first, then the responses (1/G Σ_i 1/|o_i| Σ_t), which makes a token
    of a short response weigh more than a token of a long one.
  * Two clip ranges, ε_low and ε_high ("clip-higher", DAPO); the paper's single ε is ε_low = ε_high.
  * std is the unbiased (n − 1) group std plus eps = 1e-6 in the denominator; a group whose rewards are all equal,
    or a group of one, gets advantage 0 (it carries no signal). The paper does not pin these details down.
  * Log-probs are taken at the sampling temperature: softmax(logits / τ), the distribution the tokens came from.

What it does not cover: sampling, process supervision (one outcome reward per response only), several updates per
batch (the paper's μ inner iterations), minibatching (rollflow keeps each group in one minibatch), the optimizer
(rollflow scales each step's learning rate by the share of samples with a non-zero advantage, algo.lr_by_signal),
and off-policy corrections for stale samples (π_old is simply the behaviour log-probs, given).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def right_pad(prompts: list[list[int]], responses: list[list[int]], pad_id: int) -> tuple[torch.Tensor, ...]:
    """Row i is prompts[i] + responses[i] followed by padding. Returns input_ids, attention_mask (both long) and
    response_mask (bool, True on the response tokens), each (B, T)."""
    B, T = len(prompts), max(len(p) + len(r) for p, r in zip(prompts, responses))
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((B, T), dtype=torch.long)
    response_mask = torch.zeros((B, T), dtype=torch.bool)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        input_ids[i, : len(p) + len(r)] = torch.tensor(p + r, dtype=torch.long)
        attention_mask[i, : len(p) + len(r)] = 1
        response_mask[i, len(p) : len(p) + len(r)] = True
    return input_ids, attention_mask, response_mask


def sequence_logprobs(
    model, input_ids: torch.Tensor, attention_mask: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """log π(token t | tokens < t) at every position, (B, T). Column 0 is 0: nothing in the row predicts it."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits  # (B, T, V)
    logp = torch.log_softmax(logits[:, :-1] / temperature, dim=-1)  # (B, T-1, V): position t-1 predicts token t
    taken = torch.gather(logp, 2, input_ids[:, 1:].unsqueeze(2)).squeeze(2)  # (B, T-1)
    return F.pad(taken, (1, 0))  # (B, T)


def group_advantages(rewards: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Â = (r − group mean) / (group unbiased std + eps). (G, n) → (G, n); 0 for groups of one."""
    n = rewards.shape[1]
    if n == 1:
        return torch.zeros_like(rewards)
    centred = rewards - rewards.mean(dim=1, keepdim=True)  # (G, n)
    std = (centred.pow(2).sum(dim=1, keepdim=True) / (n - 1)).sqrt()  # (G, 1)
    return centred / (std + eps)


def clipped_surrogate(
    logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, clip_low: float, clip_high: float
) -> torch.Tensor:
    """Per-token PPO loss −min(ρ·Â, clip(ρ, 1 − ε_low, 1 + ε_high)·Â), with ρ = π_θ / π_old. Shapes (N,) → (N,)."""
    ratio = torch.exp(logprobs - old_logprobs)
    return -torch.minimum(ratio * advantages, torch.clamp(ratio, 1 - clip_low, 1 + clip_high) * advantages)


def grpo_loss(
    model,
    prompts: list[list[int]],
    responses: list[list[int]],
    rewards: list[float],
    group_size: int,
    old_logprobs: list[list[float]],
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    temperature: float = 1.0,
    pad_id: int = 0,
) -> torch.Tensor:
    """The scalar GRPO loss of one batch. Samples come in complete groups: rows g·n .. g·n + n − 1 answer the same
    prompt. ``old_logprobs[i]`` holds π_old of each token of ``responses[i]``. Differentiable in the model's weights."""
    # 1. One right-padded (B, T) batch of prompt + response.
    input_ids, attention_mask, response_mask = right_pad(prompts, responses, pad_id)
    device = next(model.parameters()).device
    input_ids, attention_mask, response_mask = input_ids.to(device), attention_mask.to(device), response_mask.to(device)

    # 2. log π_θ of every response token, in row-major order: all of o_1, then all of o_2, ...
    logprobs = sequence_logprobs(model, input_ids, attention_mask, temperature)[response_mask]  # (N,) N = Σ|o_i|
    like = dict(dtype=logprobs.dtype, device=device)
    old = torch.tensor([lp for row in old_logprobs for lp in row], **like)  # (N,), same order

    # 3. Group-relative advantage of each response, repeated over its tokens (outcome supervision).
    adv_seq = group_advantages(torch.tensor(rewards, **like).view(-1, group_size)).flatten()  # (B,)
    adv = adv_seq.repeat_interleave(torch.tensor([len(r) for r in responses], device=device))  # (N,)

    # 4. Clipped surrogate per token, then the mean over all N response tokens (token-mean, see the docstring).
    return clipped_surrogate(logprobs, old, adv, clip_low, clip_high).mean()


if __name__ == "__main__":
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    V, G, n = 16, 2, 4  # vocabulary, prompts, responses per prompt
    config = GPT2Config(vocab_size=V, n_positions=32, n_embd=16, n_layer=1, n_head=2, bos_token_id=0, eos_token_id=0)
    model = GPT2LMHeadModel(config)
    randint = lambda lo, hi: int(torch.randint(lo, hi, ()))  # noqa: E731
    group_prompts = [[randint(1, V) for _ in range(randint(2, 6))] for _ in range(G)]
    prompts = [p for p in group_prompts for _ in range(n)]  # each prompt n times: groups are contiguous rows
    responses = [[randint(1, V) for _ in range(randint(1, 7))] for _ in range(G * n)]
    rewards = torch.randint(0, 2, (G * n,)).float().tolist()
    # π_old: the current policy's own log-probs, nudged so that some ratios leave the clip range.
    with torch.no_grad():
        ids, attn, resp = right_pad(prompts, responses, pad_id=0)
        current = sequence_logprobs(model, ids, attn)
    old = [(current[i][resp[i]] + 0.3 * torch.randn(int(resp[i].sum()))).tolist() for i in range(G * n)]

    loss = grpo_loss(model, prompts, responses, rewards, n, old, clip_low=0.2, clip_high=0.28, pad_id=0)
    loss.backward()
    grad_norm = torch.sqrt(sum(p.grad.pow(2).sum() for p in model.parameters() if p.grad is not None))
    print(f"rewards {rewards}\nGRPO loss {loss.item():.6f}   grad norm {grad_norm.item():.6f}")
