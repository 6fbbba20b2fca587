import torch

from rollflow.algos.batch import collate, outcome_token_rewards


def test_outcome_token_rewards_sit_on_the_last_response_token():
    mask = torch.tensor([[0.0, 0.0, 1.0, 1.0, 0.0], [0.0, 1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0, 0.0]])
    out = outcome_token_rewards(torch.tensor([2.0, -1.0, 5.0]), mask)
    # row 0: last response token at 3; row 1: at T-1 = 4; row 2: no response token, so no reward anywhere
    expected = torch.tensor([[0.0, 0.0, 0.0, 2.0, 0.0], [0.0, 0.0, 0.0, 0.0, -1.0], [0.0] * 5])
    assert torch.equal(out, expected)


def test_collate_lays_out_reference_logprobs_on_response_tokens():
    batch = collate([[1, 2], [1]], [[3], [4, 5]], pad_id=0, ref_logprobs=[[-0.5], [-0.25, -0.75]])
    # row 0: prompt 1 2, response 3 → column 2; row 1: prompt 1, response 4 5 → columns 1, 2
    assert torch.equal(batch.ref_logprobs, torch.tensor([[0.0, 0.0, -0.5], [0.0, -0.25, -0.75]]))
    assert collate([[1]], [[2]], pad_id=0).ref_logprobs is None
