"""LayerSkip-style layer dropout: each example skips layer l with a probability rising with depth.

LayerSkip (Elhoushi et al., 2024) trains early exits better when later layers are sometimes
skipped: the early layers learn to produce what the later ones would have added. Here a skipped
layer passes its input through unchanged for that example (the layer still runs, so this buys
regularisation, not speed). Rates rise linearly from 0 at the first layer to `max_rate` at the
last, LayerSkip's linear schedule. The masks derive from (seed, step), so a resumed run draws the
same ones.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn


def layer_rates(num_layers: int, max_rate: float) -> list[float]:
    """Drop probability per layer, bottom first: 0 for layer 0 rising linearly to max_rate at the last."""
    if num_layers <= 1:
        return [0.0] * num_layers
    return [max_rate * i / (num_layers - 1) for i in range(num_layers)]


def keep_masks(rates: Sequence[float], batch: int, generator: torch.Generator) -> torch.Tensor:
    """[layers, batch] booleans: True where the example runs the layer."""
    draws = torch.rand(len(rates), batch, generator=generator)  # [layers, batch]
    return draws >= torch.tensor(rates).unsqueeze(1)


@contextmanager
def dropped_layers(layers: Sequence[nn.Module], keep: torch.Tensor) -> Iterator[None]:
    """Inside: layer i's output is its input for the examples where keep[i] is False.

    Registered before any exit-capture hook, so an exit after a skipped layer sees the skip.
    """
    def hook(index: int):
        def skip(_module, args, kwargs, output):
            hidden_in = args[0] if args else kwargs["hidden_states"]  # [batch, seq, hidden]
            out = output[0] if isinstance(output, tuple) else output  # transformers < 5 returns a tuple
            runs = keep[index].to(out.device).view(-1, 1, 1)  # [batch, 1, 1]
            mixed = torch.where(runs, out, hidden_in.to(out.dtype))
            return (mixed, *output[1:]) if isinstance(output, tuple) else mixed

        return skip

    handles = [layer.register_forward_hook(hook(i), with_kwargs=True)
               for i, layer in enumerate(layers) if not bool(keep[i].all())]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
