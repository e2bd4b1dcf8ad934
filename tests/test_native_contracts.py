"""Contracts that transformers' common model tests expect of every model (issue 18): beam search with
`return_dict_in_generate`, `inputs_embeds`, `resize_token_embeddings`, static cache, `torch.compile(fullgraph=True)`,
`torch.export`, RoPE scaling, the tensor-parallel plan and the generic task heads."""

import pytest
import torch
from reso_test_models import ALL_SWITCHES, micro_config, micro_model, switch_id
from transformers.generation import GenerateBeamDecoderOnlyOutput

import reso_hf

PROMPT = torch.tensor([[4, 5, 6, 7], [0, 8, 9, 10]])
PROMPT_MASK = torch.tensor([[1, 1, 1, 1], [0, 1, 1, 1]])


# ----------------------------------------------------------------------------------------- 1. beam search


@pytest.mark.parametrize("do_sample", [False, True], ids=["beam_search", "beam_sample"])
def test_beam_search_with_return_dict_is_plain_generation_mixin(do_sample):
    model = micro_model()
    kwargs = dict(attention_mask=PROMPT_MASK, max_new_tokens=5, num_beams=3, do_sample=do_sample, pad_token_id=0,
                  output_scores=True)
    torch.manual_seed(0)
    out = model.generate(PROMPT, return_dict_in_generate=True, **kwargs)
    assert isinstance(out, GenerateBeamDecoderOnlyOutput)
    assert out.beam_indices is not None and len(out.scores) == out.sequences.shape[1] - PROMPT.shape[1]
    torch.manual_seed(0)
    assert torch.equal(out.sequences, model.generate(PROMPT, **kwargs))
