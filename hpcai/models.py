"""Built-in models and the loader of a user's own model factory. No MPI here.

A user model: ``model.factory = "path/to/file.py:make_model"`` in the job spec; ``make_model(**model.args)``
must return a ``torch.nn.Module`` mapping a batch ``(B, *sample_shape)`` to logits ``(B, num_classes)``.
If its signature names ``input_shape`` or ``num_classes`` they are passed from the dataset's manifest.
"""

from __future__ import annotations

import importlib.util
import inspect
import math
from pathlib import Path

from torch import nn

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
    c_in = input_shape[0]
    layers: list[nn.Module] = []
    for c in channels:
        layers += [nn.Conv2d(c_in, c, 3, padding=1), nn.ReLU()]
        c_in = c
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c_in, num_classes)]
    return nn.Sequential(*layers)


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


def build_model(cfg: ModelSection, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """The job's model, on the CPU, with parameters from the current torch RNG state."""
    if cfg.factory:
        fn = load_factory(cfg.factory)
        kwargs = dict(cfg.args)
        params = inspect.signature(fn).parameters
        if "input_shape" in params:
            kwargs["input_shape"] = tuple(input_shape)
        if "num_classes" in params:
            kwargs["num_classes"] = num_classes
        model = fn(**kwargs)
        if not isinstance(model, nn.Module):
            raise SpecError(
                f"model.factory: {cfg.factory} returned {type(model).__name__}, not a torch nn.Module"
            )
        return model
    if cfg.name == "mlp":
        return mlp(input_shape, num_classes, cfg.hidden)
    return cnn(input_shape, num_classes, cfg.channels)
