#!/usr/bin/env bash
# The wheel as a user gets it: build it, install it into a fresh venv outside the checkout, and from a folder
# outside the checkout run the CLI (help, presets, one tiny-model bench with no download).
# Usage: wheel_smoke.sh PYTHON CONSTRAINTS
set -euo pipefail
PY=$1
export PIP_CONSTRAINT=$2
REPO=$(cd "$(dirname "$0")/.." && pwd)
WORK=$(mktemp -d /tmp/specdec-wheel-smoke.XXXXXX)
trap 'rm -rf "$WORK"' EXIT
# Build from a copy of the files git knows (tracked, and new but not ignored): no stale build/ folder leaks in.
mkdir "$WORK/src"
git -C "$REPO" ls-files -z --cached --others --exclude-standard | (cd "$REPO" && tar --null --ignore-failed-read -T - -cf - 2>/dev/null) | tar -C "$WORK/src" -xf -
"$PY" -m pip wheel --quiet --no-deps --wheel-dir "$WORK/dist" "$WORK/src"
WHEEL=$(ls "$WORK"/dist/specdec-*.whl)
echo "wheel: $(basename "$WHEEL")"
"$PY" -m venv "$WORK/venv"
"$WORK/venv/bin/python" -m pip install --quiet --upgrade pip
"$WORK/venv/bin/python" -m pip install --quiet torch==2.13.0
"$WORK/venv/bin/python" -m pip install --quiet "$WHEEL"
cd "$WORK"  # nothing of the checkout is importable from here
BIN=$WORK/venv/bin
"$BIN/python" -c "import specdec, specdec.benchmarks, specdec.configs; assert '$REPO' not in specdec.__file__"
"$BIN/specdec" --help > /dev/null
"$BIN/specdec" bench --help > /dev/null
"$BIN/specdec" serve --help > /dev/null  # the serve extra is not installed here: its help must not need it
"$BIN/specdec" presets | tee presets.txt
grep -q "^qwen-coder-pair:" presets.txt
"$BIN/python" "$REPO/.ci/make_tiny_model.py" "$WORK/tiny"
"$BIN/specdec" bench --target "$WORK/tiny/model" --draft "$WORK/tiny/model" --dtype float32 --threads 1 \
    --prompts "$WORK/tiny/prompts.jsonl" --limit 2 --max-new-tokens 8 --baselines plain \
    --drafter prompt-lookup --drafter draft-model-tree --no-progress --output "$WORK/out"
test -s "$WORK/out/results.json"
"$BIN/python" -c "from specdec.benchmarks.prompts import read_prompts; assert len(read_prompts()) == 480"
"$BIN/specdec" train-acceptance --help > /dev/null
"$BIN/python" -c "from specdec.drafters.acceptance.head import SHIPPED; assert list(SHIPPED.glob('*/acceptance.safetensors'))"
"$BIN/python" -c "
from specdec.drafters.heads.drafter import SHIPPED
kinds = {p.parent.name.rsplit('-', 1)[1] for p in SHIPPED.glob('*/heads.safetensors')}
assert kinds >= {'medusa', 'hydra', 'clover', 'chimera', 'deer'}, kinds"
"$BIN/specdec" train --help | grep -q -- "--reuse-data"
echo "wheel smoke: ok"
