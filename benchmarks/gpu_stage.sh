#!/usr/bin/env bash
# Call 1 of a session's device work, carrying [".stage/a", ".stage/gen16"]: part a of the model (see
# ../shared/tools/gpu-stage-model.sh) and, when an earlier session brought it back, generated data
# (.stage/<step>/data.jsonl.gz from gpu_agree.sh's $OUT), put where quality.py finds a finished data
# step, so that `gpu_agree.sh start` skips sampling it again (its cost shows as nan: quote the
# session that made it).
set -euo pipefail
mkdir -p /root/stage && cp .stage/a/part /root/stage/part-a
for f in .stage/gen*/data.jsonl.gz; do
  [ -f "$f" ] || continue
  dir=/root/quality/$(basename "$(dirname "$f")")
  mkdir -p "$dir" && gunzip -c "$f" > "$dir/data.jsonl.tmp" && mv "$dir/data.jsonl.tmp" "$dir/data.jsonl"
  echo "staged $dir/data.jsonl: $(wc -l < "$dir/data.jsonl") records"
done
