"""Name -> constructor table of the model families, with example inputs for tracing."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from graphmerge.errors import ConfigError
from graphmerge.lab.zoo.bnact import bnact_resnet
from graphmerge.lab.zoo.branches import inception, repvgg, res2net
from graphmerge.lab.zoo.concat import densenet_fn, dpn, vovnet
from graphmerge.lab.zoo.convnext import convnext
from graphmerge.lab.zoo.densenet import densenet
from graphmerge.lab.zoo.functional import functional_cnn
from graphmerge.lab.zoo.gpt import gpt
from graphmerge.lab.zoo.grouped import regnet, resnext
from graphmerge.lab.zoo.levit import levit
from graphmerge.lab.zoo.mha import mha
from graphmerge.lab.zoo.mlp import mlp
from graphmerge.lab.zoo.mobilenet import mobilenet
from graphmerge.lab.zoo.mobilevit import mobilevit
from graphmerge.lab.zoo.normfree import gncnn, nfnet, wsconv
from graphmerge.lab.zoo.resnet import resnet
from graphmerge.lab.zoo.senet import senet
from graphmerge.lab.zoo.unet import unet
from graphmerge.lab.zoo.vgg import vgg
from graphmerge.lab.zoo.vgg_convhead import vgg_convhead
from graphmerge.lab.zoo.vit import vit

__all__ = ["FAMILIES", "COMMUNITY", "STYLES", "PRETRAINED", "build", "example_input", "builtin"]

FAMILIES: dict[str, Callable[..., nn.Module]] = {
    "mlp": mlp,
    "resnet": resnet,
    "vgg": vgg,
    "vit": vit,
}

# Families in the styles popular vision libraries use (issue 20), written from scratch: norm+act
# modules calling F.batch_norm, grouped bottlenecks, functional-norm concatenations, Inception and
# RepVGG branches, weight standardisation, uneven torch.split pieces, GroupNorm, attention-bias
# tables, patch unfolding, norm-free scalars, a two-conv VGG classifier. Part of COMMUNITY; inputs
# are [B, 3, 32, 32] by default.
STYLES: dict[str, Callable[..., nn.Module]] = {
    "bnact_resnet": bnact_resnet,
    "resnext": resnext,
    "regnet": regnet,
    "densenet_fn": densenet_fn,
    "dpn": dpn,
    "vovnet": vovnet,
    "inception": inception,
    "repvgg": repvgg,
    "wsconv": wsconv,
    "res2net": res2net,
    "gncnn": gncnn,
    "levit": levit,
    "mobilevit": mobilevit,
    "nfnet": nfnet,
    "vgg_convhead": vgg_convhead,
}

# Families written in styles the engine was not designed around (test material for it):
# depthwise/grouped convs, dense concatenation, transposed convs with skips, fused qkv with a
# causal mask and tied weights, nn.MultiheadAttention, channels-last layer scale, SE gating,
# bare Parameters with torch.nn.functional. Random init; `build` and `example_input` take them.
COMMUNITY: dict[str, Callable[..., nn.Module]] = {
    "mobilenet": mobilenet,
    "densenet": densenet,
    "unet": unet,
    "gpt": gpt,
    "mha": mha,
    "convnext": convnext,
    "senet": senet,
    "functional": functional_cnn,
    **STYLES,
}


def _bert_inputs(batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    from graphmerge.lab.zoo.bert import encode_texts, load_tokenizer

    texts = ["Merging models without training.", "A second, somewhat longer example sentence."]
    return encode_texts(load_tokenizer(), (texts * batch)[:batch])


def _minilm(loader_name: str) -> Callable[..., nn.Module]:
    def make(num_classes: int = 5) -> nn.Module:
        from graphmerge.lab.zoo import bert

        return bert.BertClassifier(getattr(bert, loader_name)(), num_classes)

    return make


# Pretrained or text models: name -> (constructor, example-input maker)
PRETRAINED: dict[str, tuple[Callable[..., nn.Module], Callable[[int], Any]]] = {
    "minilm-l6": (_minilm("load_minilm_l6"), _bert_inputs),
    "minilm-l3": (_minilm("load_minilm_l3"), _bert_inputs),
}


def builtin(name: str, batch: int = 2, **kwargs: Any) -> tuple[nn.Module, Any]:
    """A built-in model in eval mode and example inputs for it.

    `name` is a family of `FAMILIES` or `COMMUNITY` (random init, `kwargs` passed to its constructor) or a
    pretrained classifier of `PRETRAINED` (MiniLM encoders from their wheels with a new head).
    """
    if name in PRETRAINED:
        make, inputs = PRETRAINED[name]
        return make(**kwargs).eval(), inputs(batch)
    if name not in FAMILIES and name not in COMMUNITY:
        raise ConfigError(f"unknown model {name!r}; valid names: "
                          f"{', '.join(sorted([*FAMILIES, *COMMUNITY, *PRETRAINED]))}")
    return build(name, **kwargs).eval(), example_input(name, batch, **kwargs)


def _check_name(name: str) -> None:
    """Raise ConfigError listing the valid names if ``name`` is not a known family."""
    if name not in FAMILIES and name not in COMMUNITY:
        raise ConfigError(
            f"unknown model family {name!r}; valid names: "
            f"{', '.join(sorted([*FAMILIES, *COMMUNITY]))}"
        )


def build(name: str, **kwargs: Any) -> nn.Module:
    """Build the model family ``name`` with constructor keyword arguments ``kwargs``."""
    _check_name(name)
    return {**FAMILIES, **COMMUNITY}[name](**kwargs)


def example_input(name: str, batch: int = 2, **kwargs: Any) -> torch.Tensor:
    """A random input for family ``name``: images [batch, C, S, S] (default [batch, 1, 28, 28],
    [batch, 3, 32, 32] for the families of `STYLES`).

    ``kwargs`` may be the same keyword arguments given to :func:`build`; ``in_channels``
    and ``image_size`` are honoured (for ``mlp``, ``in_features`` != 784 gives [batch, in_features]).
    For ``gpt``: token ids, a LongTensor [batch, min(block_size, 12)] below ``vocab_size``.
    """
    _check_name(name)
    if isinstance(batch, bool) or not isinstance(batch, int) or batch <= 0:
        raise ConfigError(f"example_input: batch must be a positive int, got {batch!r}")
    if name == "gpt":
        vocab, block = kwargs.get("vocab_size", 50), kwargs.get("block_size", 16)
        return torch.randint(0, vocab, (batch, min(block, 12)))
    if name == "mlp":
        in_features = kwargs.get("in_features", 784)
        if in_features != 784:
            return torch.randn(batch, in_features)
    channels = kwargs.get("in_channels", 3 if name in STYLES else 1)
    size = kwargs.get("image_size", 32 if name in STYLES else 28)
    return torch.randn(batch, channels, size, size)
