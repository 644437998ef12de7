"""Model zoo: the model families graphmerge traces and merges (MLP, ResNet, VGG, ViT, BERT).

`COMMUNITY` holds small families in styles the engine was not designed around (MobileNetV2,
DenseNet, U-Net, GPT, nn.MultiheadAttention, ConvNeXt, SE-ResNet, functional-style CNN);
`PRETRAINED` the real MiniLM BERTs; `registry` builds any of them by name (`build`, `builtin`).
"""

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
from graphmerge.lab.zoo.convnext import ConvNeXt, ConvNeXtBlock, convnext
from graphmerge.lab.zoo.densenet import DenseLayer, DenseNet, Transition, densenet
from graphmerge.lab.zoo.functional import FunctionalCNN, functional_cnn
from graphmerge.lab.zoo.gpt import GPT, CausalSelfAttention, GPTBlock, gpt
from graphmerge.lab.zoo.mha import MHABlock, MHAClassifier, mha
from graphmerge.lab.zoo.mlp import MLP, mlp
from graphmerge.lab.zoo.mobilenet import InvertedResidual, MobileNetV2, mobilenet
from graphmerge.lab.zoo.registry import (
    COMMUNITY,
    FAMILIES,
    PRETRAINED,
    build,
    builtin,
    example_input,
)
from graphmerge.lab.zoo.resnet import BasicBlock, ResNet, resnet
from graphmerge.lab.zoo.senet import SEBlock, SENet, SqueezeExcite, senet
from graphmerge.lab.zoo.unet import DoubleConv, UNet, unet
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
    "InvertedResidual",
    "MobileNetV2",
    "mobilenet",
    "DenseLayer",
    "Transition",
    "DenseNet",
    "densenet",
    "DoubleConv",
    "UNet",
    "unet",
    "CausalSelfAttention",
    "GPTBlock",
    "GPT",
    "gpt",
    "MHABlock",
    "MHAClassifier",
    "mha",
    "ConvNeXtBlock",
    "ConvNeXt",
    "convnext",
    "SqueezeExcite",
    "SEBlock",
    "SENet",
    "senet",
    "FunctionalCNN",
    "functional_cnn",
    "FAMILIES",
    "COMMUNITY",
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
