"""Run under torchrun by tests/test_distributed.py: load a model the way a sharded run does, or the
old way (the whole model on every rank, then shard), and print this rank's peak memory growth and
what it holds, as OUT/rank-R.json (a file per rank: two ranks printing at once can share a line).

    torchrun --nproc-per-node 2 tests/sharded_load_probe.py MODEL_FOLDER sharded|whole OUT
"""

from __future__ import annotations

import json
import resource
import sys
from pathlib import Path

import torch

from manyinone.io.durable import write_text_durably
from manyinone.io.loading import build_empty, load_pretrained
from manyinone.train.distributed import Runtime


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def main(folder: str, mode: str, out: str) -> None:
    rt = Runtime.from_env()
    device = rt.device("cpu")
    # Imports first (transformers' modeling code, DCP): ~150 MiB that either way would count.
    import torch.distributed.checkpoint  # noqa: F401

    build_empty(folder)  # parameters on the meta device: it costs the imports, not the weights
    before = peak_rss_mib()
    if mode == "sharded":
        model = rt.load_sharded(folder, torch.float32, device)
        assert model is not None, "the sharded path refused a safetensors folder"
    else:
        model = rt.shard(load_pretrained(folder, dtype=torch.float32)[0])
    grown = peak_rss_mib() - before
    plain = load_pretrained(folder, dtype=torch.float32)[0]  # the reference, loaded after the measurement
    reference, plain_buffers = plain.state_dict(), dict(plain.named_buffers())
    state = model.state_dict()
    report = {
        "rank": rt.rank, "mode": mode, "peak_growth_mib": grown,
        "names_equal": sorted(state) == sorted(reference),
        "all_equal": all(torch.equal(state[k].full_tensor(), reference[k]) for k in reference),
        "local_fraction": sum(v.to_local().numel() for v in state.values()) / sum(v.numel() for v in state.values()),
        "buffers_equal": all(torch.equal(b, plain_buffers[n]) for n, b in model.named_buffers()),
    }
    write_text_durably(Path(out) / f"rank-{rt.rank}.json", json.dumps(report))
    rt.close()


if __name__ == "__main__":
    main(*sys.argv[1:4])
