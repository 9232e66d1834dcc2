"""collate_records against a batch built by hand."""
from __future__ import annotations

import pytest
import torch

from genbackends.records import GenerationRecord, collate_records


def rec(pi, prompt, toks, lps, idx=0):
    return GenerationRecord(request_id=str(pi), prompt="p", prompt_token_ids=prompt, index=idx, text="t",
                            token_ids=toks, logprobs=lps, cumulative_logprob=sum(lps), finish_reason="length",
                            prompt_index=pi)


def test_collate_matches_manual():
    recs = [rec(0, [5, 6, 7], [8, 9], [-0.5, -0.25]), rec(0, [5, 6, 7], [10], [-1.0], idx=1), rec(1, [4], [3, 2, 1], [-0.1, -0.2, -0.3])]
    b = collate_records(recs, pad_token_id=99)
    P = 99
    assert b.tokens.tolist() == [[5, 6, 7, 8, 9], [5, 6, 7, 10, P], [4, 3, 2, 1, P]]
    assert b.attention_mask.tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 1, 0], [1, 1, 1, 1, 0]]
    assert b.response_mask.tolist() == [[0, 0, 0, 1, 1], [0, 0, 0, 1, 0], [0, 1, 1, 1, 0]]
    expected_lp = torch.tensor([[0, 0, 0, -0.5, -0.25], [0, 0, 0, -1.0, 0], [0, -0.1, -0.2, -0.3, 0]])
    assert torch.allclose(b.response_logprobs, expected_lp)
    assert b.prompt_lengths.tolist() == [3, 3, 1] and b.response_lengths.tolist() == [2, 1, 3]
    assert b.prompt_indices.tolist() == [0, 0, 1] and len(b) == 3
    assert b.tokens.dtype == torch.long and b.response_mask.dtype == torch.bool and b.response_logprobs.dtype == torch.float32
    # the masked logprobs sum to each record's cumulative logprob
    assert torch.allclose((b.response_logprobs * b.response_mask).sum(1), torch.tensor([r.cumulative_logprob for r in recs]))


def test_collate_rejects_mismatch_and_empty():
    with pytest.raises(ValueError, match="record 0 .* has 2 tokens but 1 logprobs"):
        collate_records([rec(0, [1], [2, 3], [-1.0])])
    with pytest.raises(ValueError, match="at least one record"):
        collate_records([])


def test_collate_on_hf_records(tiny_llama):
    """Records of a real backend collate, and the batch's tokens re-score to its logprobs."""
    from genbackends.config_loader import load_config
    from genbackends.registry import Registry

    cfg = load_config(base={"backend": "hf", "model": str(tiny_llama), "seq_length": 32, "device": "cpu",
                            "sampling": {"max_new_tokens": 4, "temperature": 0, "ignore_eos": True}})
    with Registry(allow=["hf"]).create_backend(cfg) as b:
        recs = b.generate(["the cat", "once upon a time"])
        batch = collate_records(recs, pad_token_id=b.tokenizer.pad_token_id)
        with torch.no_grad():
            logits = b.model(input_ids=batch.tokens, attention_mask=batch.attention_mask.long()).logits
    lp = torch.log_softmax(logits[:, :-1].double(), -1).gather(-1, batch.tokens[:, 1:, None])[..., 0]
    rescored = torch.where(batch.response_mask[:, 1:], lp, torch.zeros_like(lp))
    assert torch.allclose(rescored.float(), batch.response_logprobs[:, 1:], atol=1e-4)
