"""Capture transformers-library models (the [hf] extra; small configs, random init, nothing
downloaded): torch.fx cannot trace them, torch.export can, and every check of
tests/test_capture.py holds; the residual stream and the MLP hidden layer stay free."""

from __future__ import annotations

import warnings

import pytest
import torch
from test_capture import TOL, _assert_unchanged, _like, _snapshot, check_capture

import graphmerge as gm
from graphmerge.graph.oracle import output_error

pytest.importorskip("transformers")
import hf_models  # noqa: E402  (tests/hf_models.py needs transformers)

# the parameter whose `out` axis is the residual stream (token or patch embedding), and one of
# the MLP's hidden layer: both spaces must be free
FREE = {
    "bert": ("model.bert.embeddings.word_embeddings.weight", 1,
             "model.bert.encoder.layer.0.intermediate.dense.weight", 0),
    "gpt2": ("model.transformer.wte.weight", 1, "model.transformer.h.0.mlp.c_fc.weight", 1),
    "llama": ("model.model.embed_tokens.weight", 1, "model.model.layers.0.mlp.up_proj.weight", 0),
    "vit": ("model.vit.embeddings.patch_embeddings.projection.weight", 0,
            "model.vit.layers.0.mlp.fc1.weight", 0),
    "t5_encoder": ("model.shared.weight", 1,
                   "model.encoder.block.0.layer.1.DenseReluDense.wi.weight", 0),
    "distilbert": ("model.embeddings.word_embeddings.weight", 1,
                   "model.transformer.layer.0.ffn.lin1.weight", 0),
}


@pytest.mark.parametrize("name", sorted(hf_models.HF_MODELS))
def test_transformers_model(name, tmp_path):
    model, x = hf_models.HF_MODELS[name]()
    with pytest.raises(gm.TracingError):
        gm.trace(model, x, frontend="fx")
    traced = gm.trace(model, x)  # auto: falls back to torch.export
    assert traced.frontend == "export"
    table = traced.space_table
    for param, dim in (FREE[name][:2], FREE[name][2:]):
        space = next(s for s in table if any((a.param, a.dim) == (param, dim)
                                             for a in s.params))
        assert not space.frozen, f"{param}[{dim}] is frozen: {space.why}"
    check_capture(model, x, "export", tmp_path)  # T5 exports through the core-ATen fallback


@pytest.mark.parametrize("name", sorted(hf_models.HF_MODELS))
def test_transformers_model_across_widths(name):
    """Merged with a widened, permuted copy of itself (the MLP hidden layers grow; spaces a
    norm reduces over keep their width), a transformers model comes back."""
    model, x = hf_models.HF_MODELS[name]()
    twin = gm.permute(model, x, seed=1)
    if name == "gpt2":  # Conv1D reads its width from an attribute (`nf`), outside the graph
        with pytest.raises(gm.GraphmergeError, match="outside the graph"):
            gm.widen(twin, x, extra=0.5)
        return
    wide = gm.widen(twin, x, extra=0.5)
    calibration = [tuple(_like(t, 16, 10 * k + j) for j, t in enumerate(x)) for k in range(3)]
    result = gm.merge([model, wide], calibration, x, heads="average", norms="none",
                      progress=False)
    assert any(len(set(s["widths"])) > 1 for s in result.spaces)
    assert output_error(model, result.module, calibration[0]) < TOL


@pytest.mark.parametrize("name", sorted(hf_models.HF_MODELS))
def test_transformers_model_across_depths(name):
    """Deepened to a 4-layer model of its config (the units of depth are found in the exported
    graph: attention + MLP residual pairs), a transformers model computes the same function
    (post-norm BERTs within the fitted norms' error) and comes back merged with it."""
    model, x = hf_models.HF_MODELS[name]()
    reference, _ = hf_models.HF_MODELS[name](seed=1, layers=4)
    calibration = [tuple(_like(t, 16, 10 * k + j) for j, t in enumerate(x)) for k in range(3)]
    before = _snapshot(model)
    post_norm = name in ("bert", "distilbert")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        deep = gm.deepen(gm.permute(model, x, seed=1), x, reference, calibration=calibration)
    inexact = [w for w in caught if issubclass(w.category, gm.InexactExpansionWarning)]
    assert bool(inexact) == post_norm
    assert output_error(model, deep, calibration[0]) < (0.1 if post_norm else TOL)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", gm.InexactExpansionWarning)
        result = gm.merge([model, deep], calibration, x, heads="average", norms="none",
                          progress=False)
    assert [a.depths for a in result.alignments if len(set(a.depths)) > 1] == [[2, 4]]
    assert output_error(model, result.module, calibration[0]) < (0.1 if post_norm else TOL)
    _assert_unchanged(before, model)


@pytest.mark.parametrize("name", list(hf_models.HF_MODELS))
def test_one_block_models_deepen_and_merge(name):
    """A model of one block computes, once, values that every block of a deeper model reads
    (an attention mask, a padding mask): they are the trunk's in both, so a one-block model
    lines up with a deeper one. T5 computes its position bias inside the first block and
    hands it on: with one block that cannot be told from a per-block value, and is refused."""
    model, x = hf_models.HF_MODELS[name](layers=1)
    reference, _ = hf_models.HF_MODELS[name](seed=1, layers=2)
    calibration = [tuple(_like(t, 16, 10 * k + j) for j, t in enumerate(x)) for k in range(2)]
    if name == "t5_encoder":
        with pytest.raises(gm.MismatchError, match="outside their units of depth"):
            gm.deepen(model, x, reference, calibration=calibration)
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", gm.InexactExpansionWarning)
        deep = gm.deepen(model, x, reference, calibration=calibration)
        result = gm.merge([reference, model], calibration, x, heads="average", norms="none",
                          progress=False)
    post_norm = name in ("bert", "distilbert")
    assert output_error(model, deep, calibration[0]) < (1e-3 if post_norm else TOL)
    assert [a.depths for a in result.alignments if len(set(a.depths)) > 1] == [[2, 1]]
    out = result.module(*calibration[0])
    assert out.shape == reference(*calibration[0]).shape and torch.isfinite(out).all()


@pytest.mark.parametrize("name", sorted(hf_models.HF_MODELS))
def test_transformers_models_with_different_head_counts_merge(name):
    """4 heads of width 8 merged with 6 heads of width 8 (hidden 32 and 48): heads are matched
    as wholes. LLaMA's grouped-query attention (2 then 3 key/value heads, each shared by 2
    query heads) merges its key/value heads, each with its group of queries; its rotary
    query/key dims keep their order inside each head."""
    model, x = hf_models.HF_MODELS[name]()
    other, _ = hf_models.HF_MODELS[name](seed=1, heads=6)
    calibration = [tuple(_like(t, 16, 10 * k + j) for j, t in enumerate(x)) for k in range(2)]
    result = gm.merge([model, other], calibration, x, heads="average", progress=False)
    heads = [4, 6] if name != "llama" else [2, 3]
    assert any(s["widths"] == heads for s in result.spaces)  # the (key/value) heads
    with torch.no_grad():
        out, ref = result.module(*calibration[0]), model(*calibration[0])
    assert out.shape == ref.shape and torch.isfinite(out).all()


def _llama_groups(group: int, seed: int = 0) -> torch.nn.Module:
    """A 2-layer LLaMA of hidden 48 with 2 key/value heads of 8 dims, each shared by `group`
    query heads (transformers repeats the keys by a broadcast: expand, then reshape)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=hf_models.VOCAB, hidden_size=48, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=2 * group,
                         num_key_value_heads=2, head_dim=8, max_position_embeddings=32,
                         tie_word_embeddings=False, use_cache=False)
    return hf_models._wrap(LlamaForCausalLM(config), "logits", ("input_ids",)).eval()


def test_llama_grouped_query_attention_of_different_group_sizes():
    """Groups of 2 and 3 queries per key/value head (one rotary table read by every layer)
    merge to groups of 3, the broadcast's size following the merged group; a copy whose third
    query of every group is zero (read by zero output columns: the same function) gives the
    model back, and an independent model of groups of 3 merges, finite."""
    model, x = _llama_groups(2), hf_models._token_inputs(False)
    twin = _llama_groups(3)
    with torch.no_grad():
        for p in twin.parameters():
            p.copy_(torch.zeros_like(p))
        twin.load_state_dict({k: v for k, v in model.state_dict().items()
                              if "q_proj" not in k and "o_proj" not in k}, strict=False)
        for a, b in zip(model.model.model.layers, twin.model.model.layers):
            b.self_attn.q_proj.weight.view(2, 3, 8, 48)[:, :2] = \
                a.self_attn.q_proj.weight.view(2, 2, 8, 48)
            b.self_attn.o_proj.weight.view(48, 2, 3, 8)[:, :, :2] = \
                a.self_attn.o_proj.weight.view(48, 2, 2, 8)
    calibration = [tuple(_like(t, 16, 10 * k + j) for j, t in enumerate(x)) for k in range(2)]
    assert output_error(model, twin, calibration[0]) < TOL
    result = gm.merge([model, twin], calibration, x, norms="none", progress=False)
    assert any(s["widths"] == [32, 48] for s in result.spaces)  # the query projections
    assert output_error(model, result.module, calibration[1]) < TOL
    result = gm.merge([model, _llama_groups(3, seed=1)], calibration, x, progress=False)
    with torch.no_grad():
        out = result.module(*calibration[1])
    assert out.shape == model(*calibration[1]).shape and torch.isfinite(out).all()


def test_weights_shared_across_layers_albert():
    """ALBERT runs one set of layer weights at every depth: its spaces join across the
    layers, and a self-merge gives it back."""
    from transformers import AlbertConfig, AlbertModel

    torch.manual_seed(0)
    config = AlbertConfig(vocab_size=100, embedding_size=16, hidden_size=32, num_hidden_layers=3,
                          num_attention_heads=4, intermediate_size=64, max_position_embeddings=16)
    model = hf_models._wrap(AlbertModel(config), "last_hidden_state", ("input_ids",))
    x = (torch.randint(1, 90, (4, 8)),)
    before = _snapshot(model)
    table = gm.trace(model, x).space_table
    assert sum(not s.frozen for s in table) >= 5
    result = gm.merge([model, gm.permute(model, x, seed=1)], [x, x], x, progress=False)
    assert output_error(model, result.module, x) < TOL
    _assert_unchanged(before, model)


def test_swin_self_merge_exports_to_onnx(tmp_path):
    """A two-stage Swin (windowed attention, patch merging): its self-merge comes back and
    exports with a dynamic batch axis, although torch.onnx cannot convert its attention as
    traced ("Cannot view a tensor with shape ..."): the core-ATen decomposition is exported."""
    from transformers import SwinConfig, SwinForImageClassification

    torch.manual_seed(0)
    config = SwinConfig(image_size=32, patch_size=4, num_channels=3, embed_dim=16,
                        depths=[1, 1], num_heads=[2, 2], window_size=4, num_labels=3)
    model = hf_models._wrap(SwinForImageClassification(config), "logits", ("pixel_values",))
    x = (torch.randn(2, 3, 32, 32),)
    calibration = [tuple(_like(t, 16, 10 * k + j) for j, t in enumerate(x)) for k in range(3)]
    result = gm.merge([model, gm.permute(model, x, seed=1)], calibration, x, progress=False)
    assert output_error(model, result.module, calibration[0]) < TOL
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = gm.export_onnx(result.module, x, tmp_path / "swin.onnx", atol=TOL)
    assert report.dynamic_batch and report.batch_sizes == (2, 5)
    assert report.max_rel_diff < 1e-5
    assert not any("export_onnx" in str(w.message) for w in caught)


def _llama_heads(heads: int, kv: int, seed: int = 0) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=hf_models.VOCAB, hidden_size=64, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=heads,
                         num_key_value_heads=kv, head_dim=8, max_position_embeddings=32,
                         tie_word_embeddings=False, use_cache=False)
    return hf_models._wrap(LlamaForCausalLM(config), "logits", ("input_ids",)).eval()


def test_llama_of_different_key_value_head_counts():
    """8 query heads over 2 or 4 key/value heads (groups of 4 and 2) merge, finite; over 4 or
    8 (groups of 2 and 1: transformers skips the repeat for groups of 1, so the blocks' ops
    differ) the merge is refused in one line that says the blocks are built differently."""
    x = hf_models._token_inputs(False)
    calibration = [tuple(_like(t, 16, 10 * k + j) for j, t in enumerate(x)) for k in range(2)]
    result = gm.merge([_llama_heads(8, 2), _llama_heads(8, 4, seed=1)], calibration, x,
                      progress=False)
    with torch.no_grad():
        assert torch.isfinite(result.module(*calibration[1])).all()
    with pytest.raises(gm.MismatchError, match="build this block differently") as e:
        gm.merge([_llama_heads(8, 4), _llama_heads(8, 8, seed=1)], calibration, x,
                 progress=False)
    assert "\n" not in str(e.value)
