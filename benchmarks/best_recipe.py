"""The recipe of a quality.py run whose exits agree best with its full depth on generations (the mean of
`gen_agreement` over the exits, the full depth left out): what benchmarks/gpu_next.sh drafts from.

    python benchmarks/best_recipe.py /root/quality/results.json   # prints the recipe's name, or nothing
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

NOT_CANDIDATES = ("base", "sft", "_data")  # no exits trained to agree


def mean_agreement(result: dict) -> float | None:
    values = [row.get("gen_agreement") for row in result.get("exits", [])[:-1]]
    return sum(values) / len(values) if values and None not in values else None


def best_recipe(results: dict) -> str | None:
    scored = [(score, name) for name, result in results.items()
              if name not in NOT_CANDIDATES and isinstance(result, dict)
              and (score := mean_agreement(result)) is not None]
    return max(scored)[1] if scored else None


def main() -> None:
    path = Path(sys.argv[1])
    best = best_recipe(json.loads(path.read_text())) if path.is_file() else None
    print(best or "")


if __name__ == "__main__":
    main()
