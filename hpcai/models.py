"""Built-in models (the model zoo) and the loader of a user's own model factory. No MPI here.

The zoo, chosen by ``model.name`` (each an ``nn.Sequential`` of blocks, so a pipeline can cut it into stages):

- ``mlp``: flatten, Linear+ReLU per ``model.hidden`` width, linear head.
- ``cnn``: 3x3 conv+ReLU per ``model.channels`` (2x2 max-pool after each while the image is larger than
  8x8), global average pool, linear head. 8x8 digits are never pooled: they train as before pooling existed.
- ``resnet``: a ResNet-style net of basic residual blocks (two 3x3 convs and a shortcut), ``model.blocks`` per
  stage, one stage per ``model.channels`` width, stride 2 between stages. GroupNorm, not BatchNorm: no running
  statistics that would differ across data-parallel replicas, and results do not depend on the per-rank batch.
- ``transformer``: a decoder-only language model (token + position embeddings, ``model.layers`` pre-norm
  blocks of causal self-attention and MLP, width ``model.d_model``, ``model.heads`` heads, linear head).
  Input (B, T) int64 tokens, output logits (B, V, T) -- vocabulary on dim 1, so ``nn.CrossEntropyLoss``
  takes targets (B, T) and ``argmax(1)`` is the predicted next token at every position.

Initial values: each top-level block of a built-in model is initialised by its layers' own
``reset_parameters`` from its own seed, ``block_seed(train.seed, i)``: a block's values do not depend on the
blocks before it, so a pipeline rank can build its stage alone, from a meta-device skeleton of the whole
model (:func:`model_skeleton`, :func:`materialize`), and hold exactly what one-process training starts from.

A user model: ``model.factory = "path/to/file.py:make_model"`` in the job spec; ``make_model(**model.args)``
must return a ``torch.nn.Module`` mapping a batch ``(B, *sample_shape)`` to logits ``(B, num_classes)``.
If its signature names ``input_shape`` or ``num_classes`` they are passed from the dataset's manifest.
"""

from __future__ import annotations

import importlib.util
import inspect
import math
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from hpcai.errors import SpecError
from hpcai.spec import ModelSection


def mlp(input_shape: tuple[int, ...], num_classes: int, hidden: list[int]) -> nn.Module:
    layers: list[nn.Module] = [nn.Flatten()]
    width = math.prod(input_shape)
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU()]
        width = h
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


def cnn(input_shape: tuple[int, ...], num_classes: int, channels: list[int]) -> nn.Module:
    """Small conv net for (C, H, W) images: 3x3 convs, ReLU, global average pool, linear head."""
    if len(input_shape) != 3:
        raise SpecError(
            f"model.name: cnn needs (C, H, W) samples, the dataset has shape {tuple(input_shape)}"
        )
    c_in, side = input_shape[0], min(input_shape[1:])
    layers: list[nn.Module] = []
    for c in channels:
        layers += [nn.Conv2d(c_in, c, 3, padding=1), nn.ReLU()]
        if side > 8:  # pool larger images so later convs see more of them (and cost less)
            layers.append(nn.MaxPool2d(2))
            side //= 2
        c_in = c
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c_in, num_classes)]
    return nn.Sequential(*layers)


# ------------------------------------------------------------------------------------------- resnet


def _norm(c: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(8, c), c)  # 8 groups (fewer for thin layers): batch-independent normalisation


class BasicBlock(nn.Module):
    """relu(x' + norm(conv(relu(norm(conv(x)))))); x' is x, or a strided 1x1 projection if shapes differ."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.norm1 = _norm(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.norm2 = _norm(c_out)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), _norm(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C_in, H, W) -> (B, C_out, H/s, W/s)
        h = F.relu(self.norm1(self.conv1(x)))
        return F.relu(self.norm2(self.conv2(h)) + self.shortcut(x))


def resnet(input_shape: tuple[int, ...], num_classes: int, channels: list[int], blocks: int) -> nn.Module:
    """ResNet-style: stem, ``blocks`` BasicBlocks per stage (one stage per width), pool, linear head.

    Images of 64 px or more get the ImageNet stem (7x7 stride 2 + 3x3 max-pool: 224 -> 56); smaller ones the
    CIFAR stem (one 3x3 conv), so a 32x32 image keeps its resolution into the first stage.
    """
    if len(input_shape) != 3:
        raise SpecError(
            f"model.name: resnet needs (C, H, W) samples, the dataset has shape {tuple(input_shape)}"
        )
    c_in, width = input_shape[0], channels[0]
    if min(input_shape[1:]) >= 64:
        stem = [nn.Conv2d(c_in, width, 7, 2, 3, bias=False), _norm(width), nn.ReLU(), nn.MaxPool2d(3, 2, 1)]
    else:
        stem = [nn.Conv2d(c_in, width, 3, 1, 1, bias=False), _norm(width), nn.ReLU()]
    layers: list[nn.Module] = [nn.Sequential(*stem)]
    for i, c in enumerate(channels):
        for b in range(blocks):
            layers.append(BasicBlock(width, c, stride=2 if i > 0 and b == 0 else 1))
            width = c
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, num_classes)]
    return nn.Sequential(*layers)


# ------------------------------------------------------------------------------------------- transformer


class TokenEmbedding(nn.Module):
    """(B, T) int64 tokens -> (B, T, D): token embedding plus a learned position embedding."""

    def __init__(self, vocab: int, d_model: int, max_len: int):
        super().__init__()
        self.tok = nn.Embedding(vocab, d_model)
        self.pos = nn.Embedding(max_len, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(x.shape[1], device=x.device)
        return self.tok(x) + self.pos(pos)  # (B, T, D) + (T, D)


class TransformerBlock(nn.Module):
    """Pre-norm decoder block: x + attn(ln(x)), then x + mlp(ln(x)); causal, so position t sees only <= t."""

    def __init__(self, d_model: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.ln2 = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(nn.Linear(d_model, 4 * d_model), nn.GELU(), nn.Linear(4 * d_model, d_model))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=2)  # 3 x (B, T, D)
        q, k, v = (
            a.view(b, t, self.heads, d // self.heads).transpose(1, 2) for a in (q, k, v)
        )  # (B, nh, T, hs)
        att = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, nh, T, hs)
        x = x + self.proj(att.transpose(1, 2).reshape(b, t, d))
        return x + self.mlp(self.ln2(x))


class LMHead(nn.Module):
    """(B, T, D) -> logits (B, V, T): vocabulary on dim 1, as nn.CrossEntropyLoss wants for targets (B, T)."""

    def __init__(self, d_model: int, vocab: int):
        super().__init__()
        self.ln = nn.LayerNorm(d_model)
        self.out = nn.Linear(d_model, vocab)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.ln(x)).transpose(1, 2)


def transformer(
    input_shape: tuple[int, ...], num_classes: int, d_model: int, layers: int, heads: int
) -> nn.Module:
    """Decoder-only LM over ``num_classes`` tokens, context ``input_shape[0]``: embedding, blocks, head."""
    if len(input_shape) != 1:
        raise SpecError(
            f"model.name: transformer needs (T,) token windows, the dataset has shape {tuple(input_shape)}"
        )
    if d_model % heads:
        raise SpecError(f"model.d_model: {d_model} does not split into {heads} heads")
    blocks = [TransformerBlock(d_model, heads) for _ in range(layers)]
    return nn.Sequential(
        TokenEmbedding(num_classes, d_model, input_shape[0]), *blocks, LMHead(d_model, num_classes)
    )


# ------------------------------------------------------------------------------------------- factories


def load_factory(ref: str):
    """Import ``path/to/file.py:function`` and return the function."""
    file, _, func = ref.rpartition(":")
    path = Path(file).resolve()
    spec = importlib.util.spec_from_file_location(f"hpcai_user_model_{path.stem}", path)
    if spec is None or spec.loader is None:
        raise SpecError(f"model.factory: cannot import {file!r}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # errors in the user's file propagate with their own traceback
    fn = getattr(module, func, None)
    if not callable(fn):
        raise SpecError(f"model.factory: {file!r} has no function {func!r}")
    return fn


def _from_factory(cfg: ModelSection, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    fn = load_factory(cfg.factory)
    kwargs = dict(cfg.args)
    params = inspect.signature(fn).parameters
    if "input_shape" in params:
        kwargs["input_shape"] = tuple(input_shape)
    if "num_classes" in params:
        kwargs["num_classes"] = num_classes
    try:  # a misspelt or missing argument is the spec's fault: name it, before anything runs
        inspect.signature(fn).bind(**kwargs)
    except TypeError as e:
        raise SpecError(f"model.args: {cfg.factory} cannot take them: {e}") from None
    model = fn(**kwargs)
    if not isinstance(model, nn.Module):
        raise SpecError(
            f"model.factory: {cfg.factory} returned {type(model).__name__}, not a torch nn.Module"
        )
    return model


def _zoo(cfg: ModelSection, input_shape: tuple[int, ...], num_classes: int) -> nn.Sequential:
    if cfg.name == "mlp":
        return mlp(input_shape, num_classes, cfg.hidden)
    if cfg.name == "resnet":
        return resnet(input_shape, num_classes, cfg.channels, cfg.blocks)
    if cfg.name == "transformer":
        return transformer(input_shape, num_classes, cfg.d_model, cfg.layers, cfg.heads)
    return cnn(input_shape, num_classes, cfg.channels)


# ------------------------------------------------------------------------------------------- building


def block_seed(seed: int, index: int) -> int:
    """The seed of top-level block ``index`` of a built-in model under ``train.seed = seed``."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1, np.uint64)[0])


def init_block(block: nn.Module, seed: int) -> None:
    """Initialise every parameter and buffer of ``block`` with its modules' own ``reset_parameters`` (the
    values their constructors would draw), from ``seed``; the global RNG is left as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for m in block.modules():
            own = [*m.parameters(recurse=False), *m.buffers(recurse=False)]
            if not own:
                continue
            reset = getattr(m, "reset_parameters", None)
            if reset is None:  # a built-in model must not hold state that nothing here can initialise
                raise TypeError(f"{type(m).__name__} holds parameters but has no reset_parameters()")
            reset()


def model_skeleton(cfg: ModelSection, input_shape: tuple[int, ...], num_classes: int) -> nn.Sequential | None:
    """A built-in model on the meta device: its structure, shapes and parameter counts, no storage (a pipeline
    stage allocates only its own blocks from it: :func:`materialize`). None for a user's factory."""
    if cfg.factory:
        return None
    return _zoo_on_meta(cfg, input_shape, num_classes)


def _zoo_on_meta(cfg: ModelSection, input_shape: tuple[int, ...], num_classes: int) -> nn.Sequential:
    with torch.random.fork_rng(devices=[]), torch.device("meta"):
        return _zoo(cfg, input_shape, num_classes)


def materialize(model: nn.Sequential, indices: range, seed: int) -> None:
    """Give blocks ``indices`` of a skeleton CPU storage and their initial values, each from its own seed:
    a block's values do not depend on which other blocks exist, so a pipeline stage built alone holds exactly
    what the whole model built by :func:`build_model` holds there."""
    for i in indices:
        model[i].to_empty(device="cpu")
        init_block(model[i], block_seed(seed, i))


def build_model(
    cfg: ModelSection, input_shape: tuple[int, ...], num_classes: int, seed: int = 0
) -> nn.Module:
    """The job's whole model on the CPU.

    Built-in models: every top-level block initialised from ``block_seed(seed, i)``. A user's factory runs
    once with the torch RNG seeded with ``seed`` (its constructors draw what they like, in their order); the
    global RNG is left as it was either way.
    """
    if cfg.factory:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return _from_factory(cfg, input_shape, num_classes)
    model = _zoo_on_meta(cfg, input_shape, num_classes)
    materialize(model, range(len(model)), seed)
    return model
