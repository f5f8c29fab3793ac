#!/usr/bin/env bash
# Everything a lent GPU machine is for, in one call: it has torch, numpy and PyYAML but no Ray,
# MLflow, DVC or network, and a session gets 15 minutes of it (docs/PERFORMANCE.md, "GPU").
#
#   1. ingest the CIFAR-100 archive shipped in parts (../shared/tools/device-data-parts);
#   2. `mixer bench` the seed and nano presets (pipeline loop next to the plain one, bf16 + compile)
#      and profile a seed step;
#   3. `mixer train-offline` the nano best recipe for as many epochs as fit in what is left of
#      BUDGET_S, measured from the bench's epoch time (the cosine schedule spans exactly those).
#
# Run from the project root, after the parts are joined into $ARCHIVE:
#   OUT=$OUT bash benchmarks/gpu-session.sh
# Back here: `mixer evaluate --weights DIR`, `mixer register --from DIR` and `mixer result NAME
# --weights DIR` log, register and record the trained model (DIR: the copy of $OUT/best-nano-gpu).
# Everything below is an environment variable so that tests can run it small, on the CPU.
set -euo pipefail

OUT=${OUT:?set OUT to the folder whose files come back}
DEVICE=${DEVICE:-cuda}
ARCHIVE=${ARCHIVE:-$HOME/cifar/cifar-100-python.tar.gz}
ARCHIVE_MD5=${ARCHIVE_MD5:-cc439e9b6a30f3cbdb40553f0fbc8462}
BUDGET_S=${BUDGET_S:-480}            # the whole script; a device call may run 600 s
BENCH_EPOCHS=${BENCH_EPOCHS:-4}      # per path, the first one not counted
BENCH_BATCHES=${BENCH_BATCHES:-351}  # a full epoch of 45,000 images at batch 128
MAX_EPOCHS=${MAX_EPOCHS:-300}        # the 67.51% reference trained this shape for 300
RESERVE_S=${RESERVE_S:-60}           # compile warm-up, the export and the files' way back
EXTRA=${EXTRA:-}                     # overrides added to every mixer command (tests: tiny batches)
PYTHON=${PYTHON:-python3}
NAME=best-nano-gpu

started=$SECONDS
mkdir -p "$OUT"
exec > >(tee "$OUT/log.txt") 2>&1
export PYTHONUNBUFFERED=1
mixer() { "$PYTHON" -m mixer.cli "$@"; }
# shellcheck disable=SC2086  # EXTRA is a list of key=value words
fast="train.precision=bf16 train.compile=true $EXTRA"

echo "== machine"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
"$PYTHON" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"

echo "== data"
echo "$ARCHIVE_MD5  $ARCHIVE" | md5sum -c -
MIXER_DATA_URL=$ARCHIVE MIXER_DATA_MD5=$ARCHIVE_MD5 mixer ingest $EXTRA

echo "== bench ($DEVICE)"
for preset in seed nano; do
    mixer bench --device "$DEVICE" --preset "$preset" --epochs "$BENCH_EPOCHS" --batches "$BENCH_BATCHES" \
        --out "$OUT/bench-$preset.json" $fast
done
mixer bench --device "$DEVICE" --preset seed --profile $fast

echo "== train $NAME"
left=$((BUDGET_S - (SECONDS - started) - RESERVE_S))
# The pipeline's measured rate over the train split as ingested, plus 10% for validation.
epochs=$("$PYTHON" - "$OUT/bench-nano.json" "$left" "$MAX_EPOCHS" $EXTRA <<'EOF'
import json, sys
from mixer import config, data
rate = json.load(open(sys.argv[1]))["pipeline"]["train_images_per_s"]
cfg = config.load(None, config.parse_overrides(sys.argv[4:]))
images = data.load_meta(cfg.data.out_dir)["counts"]["train"]
if cfg.train.limit_train_batches:  # tests cut epochs short
    images = min(images, cfg.train.limit_train_batches * cfg.train.batch_size)
epoch_s = images / rate * 1.1
print(max(0, min(int(sys.argv[3]), int(float(sys.argv[2]) / epoch_s))))
print(f"{sys.argv[2]} s left, {epoch_s:.1f} s per nano epoch of {images} images", file=sys.stderr)
EOF
)
echo "$epochs epochs"
if [ "$epochs" -lt 1 ]; then
    echo "no time left to train"
    exit 0
fi
warmup=$((epochs < 50 ? 1 : 5))
mixer train-offline --device "$DEVICE" --checkpoints "${TMPDIR:-/tmp}/$NAME-checkpoints" model.preset=nano \
    train.epochs="$epochs" train.lr=2.0e-3 train.weight_decay=0.05 train.schedule=cosine \
    train.warmup_epochs=$warmup train.label_smoothing=0.1 train.augment.crop_padding=4 train.augment.mixup=0.2 \
    train.augment.cutmix=1.0 train.early_stopping_patience=0 train.models_dir="$OUT/$NAME" \
    train.run_name=$NAME $fast
echo "== done in $((SECONDS - started)) s"
