"""The oracle on real pretrained BERTs (all-MiniLM-L6-v2 and paraphrase-MiniLM-L3-v2)."""

import pytest
import torch

import graphmerge as gm
from graphmerge.lab.zoo import bert


@pytest.fixture(scope="module")
def tokens():
    tok = bert.load_tokenizer()
    return bert.encode_texts(tok, ["graph merging without training", "a short one"])


@pytest.mark.parametrize("loader", [bert.load_minilm_l6, bert.load_minilm_l3])
def test_oracle_on_pretrained_minilm(loader, tokens):
    model = bert.BertClassifier(loader(), num_classes=5).eval()
    report = gm.check_spaces(model, tokens, trials=1)
    assert report.max_output_error < 1e-5 and report.changed_tensors > 0
    table = gm.trace(model, tokens).space_table
    stream = table[table.param_axes["bert.embeddings.word_embeddings.weight"][1]]
    assert stream.width == 384 and not stream.frozen
    hidden = table[table.param_axes["bert.encoder.layer.0.intermediate.dense.weight"][0]]
    assert hidden.width == 1536 and not hidden.frozen


def test_tiny_bert_oracle_with_padding():
    model = bert.tiny_bert_classifier().eval()
    ids = torch.randint(0, 100, (3, 8))
    mask = torch.ones(3, 8, dtype=torch.long)
    mask[1, 5:] = 0
    report = gm.check_spaces(model, (ids, mask), trials=3)
    assert report.max_output_error < 1e-5 and report.changed_tensors > 0
