#!/usr/bin/env bash
# One slide end to end, each step under /usr/bin/time -v (wall, CPU, peak RSS in DIR/logs/<step>.time):
# prep, verify, one training epoch, predict, heatmap, and level-0 tile latency of `ips view`.
#
# usage: benchmarks/e2e.sh DIR MAIN [PREP_FLAGS...]
#   DIR/*.tiff       the slides (e.g. from `ips synth big-slide`); MAIN is the slide id to predict, draw and view
#   DIR/manifest.csv slide_id,path,label,split with path stores/<slide_id>.zarr (relative to DIR)
#   PREP_FLAGS       default: --patch-size 256 --mpp 0.5 (the README's command)
# Environment: PY (default python), NICE (default "nice -n 15"), CONFIG (default configs/demo.yaml),
# PATCH (the stores' patch size, default 256).
set -euo pipefail
dir=$(cd "$1" && pwd); main=$2; shift 2
flags=("$@"); [ ${#flags[@]} -eq 0 ] && flags=(--patch-size 256 --mpp 0.5)
repo=$(cd "$(dirname "$0")/.." && pwd)
py=${PY:-python}; ips="$py -m ips.cli"; nice=${NICE:-nice -n 15}; config=${CONFIG:-$repo/configs/demo.yaml}
patch=${PATCH:-256}
mkdir -p "$dir/logs"
step() { local name=$1; shift; echo "== $name: $*"; $nice /usr/bin/time -v -o "$dir/logs/$name.time" "$@"; }

step prep $ips prep "$dir"/*.tiff --out "$dir/stores" "${flags[@]}" --workers 1 --threads 1 --quiet
step verify $ips verify "$dir"/stores/*.zarr
step train $ips train --config "$config" --manifest "$dir/manifest.csv" --out "$dir/run" --overwrite --quiet \
  --threads 1 --device cpu train.epochs=1 model.patch_size="$patch"
ckpt=$(ls "$dir"/run/checkpoints/*.pt | head -1)
step predict $ips predict --checkpoint "$ckpt" --out "$dir/preds" --device cpu --threads 1 --quiet "$dir/stores/$main.zarr"
step heatmap $ips heatmap --checkpoint "$ckpt" --out "$dir/heatmaps" --device cpu --threads 1 --quiet "$dir/stores/$main.zarr"
port=$((20000 + RANDOM % 20000))
$nice /usr/bin/time -v -o "$dir/logs/view.time" $ips view "$dir/stores/$main.zarr" --heatmaps "$dir/heatmaps" --port "$port" \
  > "$dir/logs/view.out" 2>&1 &
viewer=$!
for _ in $(seq 120); do curl -sf "http://127.0.0.1:$port/api/slides" > /dev/null && break; sleep 1; done
$nice $py "$repo/benchmarks/view_latency.py" "http://127.0.0.1:$port" "$main" | tee "$dir/logs/view_latency.json"
pkill -TERM -P "$viewer"; wait "$viewer" || true  # stop the viewer, not time(1)
du -sb "$dir"/*.tiff "$dir"/stores/*.zarr | tee "$dir/logs/sizes.txt"
