#!/usr/bin/env bash
# Call 1 of a session's device work, carrying [".stage/a", ".stage/gen16"]: part a of the model (see
# ../shared/tools/gpu-stage-model.sh) and, when an earlier session brought it back, generated data
# from gpu_agree.sh's $OUT, put where quality.py looks for it:
#   .stage/<step>/data.jsonl.gz  finished: `gpu_agree.sh start` skips sampling it (its cost shows as
#                                nan: quote the session that made it);
#   .stage/<step>/data.jsonl.partial.gz + data.jsonl.partial.json  unfinished: sampling resumes at
#                                the first missing batch (same settings, same per-batch seeds).
set -euo pipefail
mkdir -p /root/stage && cp .stage/a/part /root/stage/part-a
for f in .stage/gen*/data.jsonl.gz .stage/gen*/data.jsonl.partial.gz; do
  [ -f "$f" ] || continue
  dir=/root/quality/$(basename "$(dirname "$f")")
  name=$(basename "$f" .gz)
  mkdir -p "$dir" && gunzip -c "$f" > "$dir/$name.tmp" && mv "$dir/$name.tmp" "$dir/$name"
  [ "$name" = data.jsonl ] || cp "$(dirname "$f")/data.jsonl.partial.json" "$dir/"
  echo "staged $dir/$name: $(wc -l < "$dir/$name") records"
done
