"""Model zoo: the model families graphmerge traces and merges (MLP, ResNet, VGG, ViT, BERT)."""

from graphmerge.lab.zoo.bert import (
    BertClassifier,
    BertConfig,
    BertEncoder,
    encode_texts,
    load_minilm_l3,
    load_minilm_l6,
    load_tokenizer,
    mean_pool,
    tiny_bert_classifier,
)
from graphmerge.lab.zoo.mlp import MLP, mlp
from graphmerge.lab.zoo.registry import (
    FAMILIES,
    PRETRAINED,
    build,
    builtin,
    example_input,
)
from graphmerge.lab.zoo.resnet import BasicBlock, ResNet, resnet
from graphmerge.lab.zoo.vgg import VGG, vgg
from graphmerge.lab.zoo.vit import Attention, ViT, ViTBlock, vit

__all__ = [
    "MLP",
    "mlp",
    "BasicBlock",
    "ResNet",
    "resnet",
    "VGG",
    "vgg",
    "Attention",
    "ViTBlock",
    "ViT",
    "vit",
    "FAMILIES",
    "PRETRAINED",
    "build",
    "builtin",
    "example_input",
    "BertConfig",
    "BertEncoder",
    "BertClassifier",
    "load_minilm_l6",
    "load_minilm_l3",
    "load_tokenizer",
    "encode_texts",
    "tiny_bert_classifier",
    "mean_pool",
]
