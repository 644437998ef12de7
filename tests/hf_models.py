"""Tiny Hugging Face ``transformers`` models for tests (the optional ``[hf]`` extra).

Every model is built from a ``XxxConfig(...)`` object with seeded random weights: nothing is
downloaded. Each builder returns ``(model, example_inputs)`` where ``model`` is an
:class:`HFWrapper` in eval mode (the Hugging Face model is ``model.model``) and
``example_inputs`` is a tuple of tensors with batch size 2, passed positionally:
``model(*example_inputs)`` returns ONE tensor (logits or last hidden state), so the wrapper
can be captured with ``torch.export.export(model, example_inputs, strict=False)``.
``torch.fx.symbolic_trace`` cannot trace these models; use torch.export.

Sizes: hidden 32, 2 layers (`layers=`), 4 heads of width 8 (`heads=`; hidden = 8 · heads),
vocab 100, sequence length 8, images 16x16 with 4x4
patches. Attention is ``"sdpa"`` by default (one ``aten.scaled_dot_product_attention`` node
per layer); pass ``attn="eager"`` for the matmul/softmax form. Both export cleanly.

Inputs:
    bert, t5_encoder, distilbert: (input_ids int64 [2, 8], attention_mask int64 [2, 8]); the
        second row's last two tokens are padding (mask 0).
    gpt2, llama: (input_ids int64 [2, 8],): causal mask only, no padding, no cache.
    vit: (pixel_values float32 [2, 3, 16, 16],).

Notes for graph capture (transformers 5.23.0, torch 2.13.0, non-strict torch.export):
    * outputs match eagerly run models exactly; a dynamic batch axis exports too, and the
      wrapper shares its parameters with the graph module (tied weights stay tied).
    * llama's rotary embedding runs under ``@torch.no_grad()``: exported with grad enabled, it
      becomes a ``wrap_with_set_grad_enabled`` call on a ``submod_*`` graph module; export
      under ``torch.no_grad()`` to get flat aten ops instead.
    * GPT-2 uses ``Conv1D`` (``aten.addmm`` with weight [in, out]) and one fused q/k/v
      projection split with ``aten.split``; T5's bucket computation keeps an in-place
      ``aten.add_`` on int64; attention masks are built in the graph as bool tensors
      (T5 with sdpa passes a float bias + mask).
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = [
    "HF_MODELS",
    "HFWrapper",
    "bert",
    "distilbert",
    "gpt2",
    "llama",
    "t5_encoder",
    "vit",
]

VOCAB = 100
SEQ = 8
BATCH = 2
HIDDEN = 32
LAYERS = 2
HEADS = 4
HEAD_DIM = HIDDEN // HEADS
IMAGE = 16
PATCH = 4
DEFAULT_ATTN = "sdpa"


class HFWrapper(nn.Module):
    """Call a Hugging Face model with positional tensors and return one output tensor.

    Args:
        model: a ``transformers`` PreTrainedModel.
        output: the field of the model's output to return (``"logits"``,
            ``"last_hidden_state"``, ...).
        input_names: the keyword each positional input is passed as, in order.
        head: if given, (hidden size, classes) of a linear head applied to the output, so that
            the output is not the residual stream itself (a graph output keeps its axes).
    """

    # forward has named positional parameters (not *inputs), so that torch.export accepts a
    # flat `dynamic_shapes` tuple with one entry per input (e.g. a dynamic batch axis)
    MAX_INPUTS = 3

    def __init__(self, model: nn.Module, output: str = "logits",
                 input_names: tuple[str, ...] = ("input_ids",),
                 head: tuple[int, int] | None = None):
        super().__init__()
        if not 1 <= len(input_names) <= self.MAX_INPUTS:
            raise ValueError(f"HFWrapper takes 1 to {self.MAX_INPUTS} inputs, "
                             f"got {len(input_names)}")
        self.model = model
        self.output = output
        self.input_names = tuple(input_names)
        self.head = None if head is None else nn.Linear(*head)

    def forward(self, input0: torch.Tensor, input1: torch.Tensor | None = None,
                input2: torch.Tensor | None = None) -> torch.Tensor:
        inputs = (input0, input1, input2)[: len(self.input_names)]
        out = self.model(**dict(zip(self.input_names, inputs)), return_dict=True)[self.output]
        return out if self.head is None else self.head(out)


def _token_inputs(with_mask: bool) -> tuple[torch.Tensor, ...]:
    input_ids = torch.randint(1, VOCAB, (BATCH, SEQ))
    if not with_mask:
        return (input_ids,)
    attention_mask = torch.ones(BATCH, SEQ, dtype=torch.long)
    attention_mask[1, -2:] = 0
    input_ids[1, -2:] = 0  # pad token id 0
    return input_ids, attention_mask


def _wrap(model: nn.Module, output: str, input_names: tuple[str, ...],
          head: tuple[int, int] | None = None) -> HFWrapper:
    return HFWrapper(model, output, input_names, head).eval()


def bert(seed: int = 0, layers: int = LAYERS, heads: int = HEADS,
         attn: str = DEFAULT_ATTN) -> tuple[HFWrapper, tuple[torch.Tensor, ...]]:
    """BertForSequenceClassification (3 labels, pooler + classifier) -> logits [2, 3]."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    hidden = heads * HEAD_DIM
    config = BertConfig(
        vocab_size=VOCAB, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
        intermediate_size=4 * hidden, max_position_embeddings=32, type_vocab_size=2,
        num_labels=3, pad_token_id=0, attn_implementation=attn,
    )
    model = BertForSequenceClassification(config)
    return _wrap(model, "logits", ("input_ids", "attention_mask")), _token_inputs(True)


def gpt2(seed: int = 0, layers: int = LAYERS, heads: int = HEADS,
         attn: str = DEFAULT_ATTN) -> tuple[HFWrapper, tuple[torch.Tensor, ...]]:
    """GPT2LMHeadModel (causal, LM head tied to the token embedding) -> logits [2, 8, 100]."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    hidden = heads * HEAD_DIM
    config = GPT2Config(
        vocab_size=VOCAB, n_positions=32, n_embd=hidden, n_layer=layers, n_head=heads,
        n_inner=4 * hidden, bos_token_id=1, eos_token_id=2, use_cache=False,
        tie_word_embeddings=True, attn_implementation=attn,
    )
    model = GPT2LMHeadModel(config)
    assert model.lm_head.weight is model.transformer.wte.weight, "GPT-2 LM head is not tied"
    return _wrap(model, "logits", ("input_ids",)), _token_inputs(False)


def llama(seed: int = 0, layers: int = LAYERS, heads: int = HEADS,
          attn: str = DEFAULT_ATTN) -> tuple[HFWrapper, tuple[torch.Tensor, ...]]:
    """LlamaForCausalLM: GQA (4 query heads, 2 key/value heads; heads // 2 in general), RMSNorm, RoPE, SwiGLU MLP,
    untied LM head -> logits [2, 8, 100]."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    hidden = heads * HEAD_DIM
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=hidden, intermediate_size=3 * hidden,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads // 2,
        max_position_embeddings=32, hidden_act="silu", rms_norm_eps=1e-6,
        tie_word_embeddings=False, use_cache=False, attn_implementation=attn,
    )
    model = LlamaForCausalLM(config)
    return _wrap(model, "logits", ("input_ids",)), _token_inputs(False)


def vit(seed: int = 0, layers: int = LAYERS, heads: int = HEADS,
        attn: str = DEFAULT_ATTN) -> tuple[HFWrapper, tuple[torch.Tensor, ...]]:
    """ViTForImageClassification (16x16 RGB, 4x4 patches, CLS token, 5 labels) -> logits [2, 5]."""
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(seed)
    hidden = heads * HEAD_DIM
    config = ViTConfig(
        hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
        intermediate_size=4 * hidden, image_size=IMAGE, patch_size=PATCH, num_channels=3,
        num_labels=5, attn_implementation=attn,
    )
    model = ViTForImageClassification(config)
    return _wrap(model, "logits", ("pixel_values",)), (torch.randn(BATCH, 3, IMAGE, IMAGE),)


def t5_encoder(seed: int = 0, layers: int = LAYERS, heads: int = HEADS,
               attn: str = DEFAULT_ATTN) -> tuple[HFWrapper, tuple[torch.Tensor, ...]]:
    """T5EncoderModel (relative position bias in layer 0, T5 RMS LayerNorm, ReLU FFN)
    with a linear head -> per-token logits [2, 8, 3]."""
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    hidden = heads * HEAD_DIM
    config = T5Config(
        vocab_size=VOCAB, d_model=hidden, d_kv=HEAD_DIM, d_ff=4 * hidden,
        num_layers=layers, num_heads=heads, relative_attention_num_buckets=8,
        relative_attention_max_distance=16, feed_forward_proj="relu", use_cache=False,
        pad_token_id=0, attn_implementation=attn,
    )
    model = T5EncoderModel(config)
    return (_wrap(model, "last_hidden_state", ("input_ids", "attention_mask"), (hidden, 3)),
            _token_inputs(True))


def distilbert(seed: int = 0, layers: int = LAYERS, heads: int = HEADS,
               attn: str = DEFAULT_ATTN) -> tuple[HFWrapper, tuple[torch.Tensor, ...]]:
    """DistilBertModel with a linear head -> per-token logits [2, 8, 3]."""
    from transformers import DistilBertConfig, DistilBertModel

    torch.manual_seed(seed)
    hidden = heads * HEAD_DIM
    config = DistilBertConfig(
        vocab_size=VOCAB, dim=hidden, n_layers=layers, n_heads=heads, hidden_dim=4 * hidden,
        max_position_embeddings=32, pad_token_id=0, attn_implementation=attn,
    )
    model = DistilBertModel(config)
    return (_wrap(model, "last_hidden_state", ("input_ids", "attention_mask"), (hidden, 3)),
            _token_inputs(True))


HF_MODELS = {
    "bert": bert,
    "gpt2": gpt2,
    "llama": llama,
    "vit": vit,
    "t5_encoder": t5_encoder,
    "distilbert": distilbert,
}
