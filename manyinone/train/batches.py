"""A run's examples and which of them each micro-batch reads.

The labelled records (packed if asked) come first, then the mixed-in ones; each epoch's order is
drawn from (seed, epoch), and rank r of a torchrun run takes every world-th micro-batch of it, so
a resumed run and every rank read exactly the rows the uninterrupted single run would.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from manyinone.core.errors import ManyinoneError
from manyinone.train import distributed
from manyinone.train.config import TrainConfig
from manyinone.train.data import Example, collate, load_records, mixed_count, mixed_epoch_order, pack, tokenize_records
from manyinone.train.on_policy import on_policy_batch


@dataclass
class RunData:
    examples: list[Example]  # indices [0, labelled) the labelled rows, [labelled, labelled + pool) the mixed-in ones
    unpacked: list[Example]  # rows before packing, labelled first: what importance calibration reads
    labelled: int
    pool: int
    pool_per_epoch: int
    steps_per_epoch: int
    total_steps: int


def load_run_data(cfg: TrainConfig, tokenizer, world: int) -> RunData:
    """Tokenize (and pack) the run's records and count its steps; too few examples for one step fail here."""
    records = load_records(cfg.data, cfg.rows, cfg.data_subset, cfg.data_split, cfg.data_columns)
    examples = tokenize_records(records, tokenizer, cfg.max_length, cfg.template)
    pool = tokenize_records(load_records(cfg.mix_data, cfg.mix_rows), tokenizer, cfg.max_length, cfg.template) \
        if cfg.mix_data else []
    unpacked = examples
    if cfg.packing:  # labelled and mixed-in rows are packed apart, so mix_ratio still counts rows of each
        examples, pool = pack(examples, cfg.max_length), pack(pool, cfg.max_length) if pool else []
    else:
        unpacked = examples + pool  # unpacked, calibration reads mixed-in rows after the labelled ones
    labelled = len(examples)
    pool_per_epoch = mixed_count(labelled, len(pool), cfg.mix_ratio) if pool else 0
    epoch_size = (0 if pool and cfg.mix_ratio == 1 else labelled) + pool_per_epoch
    per_step = cfg.batch_size * cfg.grad_accum * world
    steps_per_epoch = epoch_size // per_step
    if steps_per_epoch == 0:
        raise ManyinoneError(f"{epoch_size} examples < batch_size*grad_accum={per_step}; lower the batch size")
    total_steps = cfg.max_steps or math.ceil(cfg.epochs * steps_per_epoch)
    return RunData(examples + pool, unpacked, labelled, len(pool), pool_per_epoch, steps_per_epoch, total_steps)


@dataclass
class MicroBatches:
    """`batches(step, micro)`: this rank's micro-batch `micro` of optimizer step `step`, on `device`.
    With `on_policy` (a sampler), part of its rows get the current model's own responses."""

    data: RunData
    cfg: TrainConfig
    rt: distributed.Runtime
    pad_id: int
    eos_id: int | None
    device: torch.device
    on_policy: Any = None
    _order: dict[int, list[int]] = field(default_factory=dict)  # the current epoch's example order only

    def __call__(self, step: int, micro: int) -> dict[str, torch.Tensor]:
        cfg, data = self.cfg, self.data
        epoch, within = divmod(step, data.steps_per_epoch)
        if epoch not in self._order:
            self._order.clear()
            self._order[epoch] = mixed_epoch_order(data.labelled, data.pool, data.pool_per_epoch, cfg.mix_ratio,
                                                   cfg.seed, epoch)
        first = distributed.micro_batch_start(within, micro, cfg.grad_accum, cfg.batch_size, self.rt.world, self.rt.rank)
        chosen = [data.examples[i] for i in self._order[epoch][first:first + cfg.batch_size]]
        if self.on_policy is not None:
            chosen = on_policy_batch(chosen, self.on_policy, cfg.on_policy_ratio, cfg.seed, step, micro, cfg.max_length,
                                     self.eos_id)
        return {k: v.to(self.device) for k, v in collate(chosen, self.pad_id).items()}

    def calibration(self, batches: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(input_ids, attention_mask) of the first `batches` micro-batches of plain labelled rows, for
        importance scoring before any width is trained."""
        rows, size = self.data.unpacked, self.cfg.batch_size
        plain = [collate(rows[i:i + size], self.pad_id) for i in range(0, min(len(rows), batches * size), size)]
        return [(b["input_ids"].to(self.device), b["attention_mask"].to(self.device)) for b in plain]
