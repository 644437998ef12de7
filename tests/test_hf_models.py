"""The tiny Hugging Face models of tests/hf_models.py build, run, and export with torch.export.

Skipped when the optional ``[hf]`` extra (transformers) is not installed.
"""

from __future__ import annotations

import warnings

import pytest
import torch

pytest.importorskip("transformers")

from hf_models import HF_MODELS, HFWrapper

NAMES = sorted(HF_MODELS)


def _export(model, inputs, dynamic_batch=False):
    shapes = None
    if dynamic_batch:
        batch = torch.export.Dim("batch")
        shapes = tuple({0: batch} for _ in inputs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.export.export(model, inputs, strict=False, dynamic_shapes=shapes).module()


@pytest.mark.parametrize("name", NAMES)
def test_builds_and_runs(name):
    model, inputs = HF_MODELS[name]()
    assert isinstance(model, HFWrapper)
    assert not model.training and not model.model.training
    assert isinstance(inputs, tuple) and all(isinstance(x, torch.Tensor) for x in inputs)
    assert all(x.shape[0] == 2 for x in inputs)
    assert model.model.config._attn_implementation == "sdpa"
    with torch.no_grad():
        out = model(*inputs)
    assert isinstance(out, torch.Tensor) and out.shape[0] == 2
    assert torch.isfinite(out).all()
    # seeded: a second build has the same weights and inputs
    model2, inputs2 = HF_MODELS[name]()
    assert all(torch.equal(a, b) for a, b in zip(inputs, inputs2, strict=True))
    sd, sd2 = model.state_dict(), model2.state_dict()
    assert sd.keys() == sd2.keys() and all(torch.equal(sd[k], sd2[k]) for k in sd)


@pytest.mark.parametrize("name", NAMES)
def test_export_reproduces_output(name):
    model, inputs = HF_MODELS[name]()
    keys = set(model.state_dict())
    attrs = set(model.model.__dict__)
    with torch.no_grad():
        expected = model(*inputs)
    gm = _export(model, inputs)
    with torch.no_grad():
        got = gm(*inputs)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    # exporting leaves the model as it was, and the graph module shares its parameters
    assert set(model.state_dict()) == keys and set(model.model.__dict__) == attrs
    params = dict(model.named_parameters())
    for key, p in gm.named_parameters():
        assert p is params[key]


@pytest.mark.parametrize("name", NAMES)
def test_export_dynamic_batch(name):
    model, inputs = HF_MODELS[name]()
    gm = _export(model, inputs, dynamic_batch=True)
    bigger = tuple(torch.cat([x, x[:1]]) for x in inputs)
    with torch.no_grad():
        torch.testing.assert_close(gm(*bigger), model(*bigger), atol=1e-5, rtol=0)


def test_eager_attention_exports():
    model, inputs = HF_MODELS["bert"](attn="eager")
    assert model.model.config._attn_implementation == "eager"
    gm = _export(model, inputs)
    ops = {n.target for n in gm.graph.nodes if n.op == "call_function"}
    assert torch.ops.aten.softmax.int in ops
    assert torch.ops.aten.scaled_dot_product_attention.default not in ops
    with torch.no_grad():
        torch.testing.assert_close(gm(*inputs), model(*inputs), atol=1e-5, rtol=0)


def test_gpt2_head_is_tied():
    model, inputs = HF_MODELS["gpt2"]()
    hf = model.model
    assert hf.lm_head.weight is hf.transformer.wte.weight
    assert model(*inputs).shape == (2, 8, hf.config.vocab_size)
    gm = _export(model, inputs)
    assert gm.model.lm_head.weight is gm.model.transformer.wte.weight


def test_llama_uses_grouped_query_attention():
    model, _ = HF_MODELS["llama"]()
    config = model.model.config
    assert config.num_key_value_heads < config.num_attention_heads
    attn = model.model.model.layers[0].self_attn
    assert attn.k_proj.out_features * 2 == attn.q_proj.out_features
    assert type(model.model.model.norm).__name__ == "LlamaRMSNorm"
    assert not (model.model.lm_head.weight is model.model.model.embed_tokens.weight)


def test_padding_mask_matters():
    """The attention mask is really used: changing a padded token leaves real tokens alone."""
    model, (ids, mask) = HF_MODELS["bert"]()
    hf = model.model.bert
    with torch.no_grad():
        a = hf(input_ids=ids, attention_mask=mask).last_hidden_state
        ids2 = ids.clone()
        ids2[1, -1] = 7
        b = hf(input_ids=ids2, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(a[:, :-2], b[:, :-2], atol=1e-6, rtol=0)
