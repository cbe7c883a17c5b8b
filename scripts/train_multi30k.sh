#!/usr/bin/env bash
# Reproducible recipe of ../shared/models/multi30k_en_de: a stock fairseq
# `transformer` (3+3 layers, d=256) trained on Multi30k En->De with a joint
# SentencePiece BPE vocabulary.
#
#   scripts/train_multi30k.sh DATA_DIR OUT_DIR
#
# DATA_DIR holds train/val/test_2016_flickr .en/.de (raw text, .gz or plain).
# OUT_DIR receives the same layout as the shared model: checkpoint_best.pt
# (optimizer state removed), dict.en.txt, dict.de.txt, spm8k.model, data-bin/.
#
# Environment knobs (defaults reproduce the shared model; about 37 minutes on
# 2 CPU threads):
#   MAX_LINES=N     train on the first N training pairs only (default: all)
#   VALID_LINES=N   keep only the first N val and test pairs (default: all)
#   MAX_UPDATE=N    stop after N updates (default: none, MAX_EPOCH epochs)
#   MAX_EPOCH=N     default 12
#   MAX_TOKENS=N    default 4096
#   VOCAB_SIZE=N    SentencePiece vocabulary size, default 8000 (a small slice
#                   needs a smaller one)
#   PYTHON=path     interpreter whose fairseq tools are used (default: .venv)
set -euo pipefail

if [[ $# -ne 2 ]]; then
  echo "usage: $0 DATA_DIR OUT_DIR" >&2
  exit 2
fi
DATA_DIR=$1
OUT_DIR=$2
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PYTHON=${PYTHON:-$ROOT/.venv/bin/python}
BIN=$(dirname "$PYTHON")
MAX_EPOCH=${MAX_EPOCH:-12}
MAX_TOKENS=${MAX_TOKENS:-4096}
VOCAB_SIZE=${VOCAB_SIZE:-8000}
SPLITS=(train val test_2016_flickr)

for tool in "$PYTHON" "$BIN/fairseq-preprocess" "$BIN/fairseq-train"; do
  [[ -x $tool ]] || { echo "$0: $tool not found (run make install)" >&2; exit 1; }
done

mkdir -p "$OUT_DIR/raw" "$OUT_DIR/spm"

# 1. Raw text, decompressed; splits optionally cut to MAX_LINES / VALID_LINES.
for split in "${SPLITS[@]}"; do
  for lang in en de; do
    if [[ -f $DATA_DIR/$split.$lang.gz ]]; then
      src=(gzip -dc "$DATA_DIR/$split.$lang.gz")
    elif [[ -f $DATA_DIR/$split.$lang ]]; then
      src=(cat "$DATA_DIR/$split.$lang")
    else
      echo "$0: missing $DATA_DIR/$split.$lang(.gz)" >&2
      exit 1
    fi
    limit=${VALID_LINES:-}
    [[ $split == train ]] && limit=${MAX_LINES:-}
    if [[ -n $limit ]]; then
      # head closes the pipe early: the decompressor's SIGPIPE is expected.
      (set +o pipefail; "${src[@]}" | head -n "$limit" >"$OUT_DIR/raw/$split.$lang")
    else
      "${src[@]}" >"$OUT_DIR/raw/$split.$lang"
    fi
  done
done

# 2. Joint SentencePiece BPE model, every split encoded to pieces, and the
#    fairseq dictionary (the SentencePiece vocabulary without <unk>).
"$PYTHON" - "$OUT_DIR" "$VOCAB_SIZE" "${SPLITS[@]}" <<'EOF'
import sys
from pathlib import Path

import sentencepiece as spm

out, vocab_size, splits = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3:]
spm.SentencePieceTrainer.train(
    input=f"{out}/raw/train.en,{out}/raw/train.de",
    model_prefix=str(out / "spm8k"),
    model_type="bpe",
    vocab_size=vocab_size,
    character_coverage=1.0,
    bos_id=-1,
    eos_id=-1,
    pad_id=-1,
    unk_id=0,
    minloglevel=2,
)
sp = spm.SentencePieceProcessor(model_file=str(out / "spm8k.model"))
for split in splits:
    for lang in ("en", "de"):
        lines = (out / "raw" / f"{split}.{lang}").read_text(encoding="utf-8").splitlines()
        pieces = sp.encode(lines, out_type=str)
        text = "".join(" ".join(p) + "\n" for p in pieces)
        (out / "spm" / f"{split}.{lang}").write_text(text, encoding="utf-8")
with open(out / "dict.txt", "w", encoding="utf-8") as f:
    for i in range(sp.get_piece_size()):
        if i != sp.unk_id():
            f.write(f"{sp.id_to_piece(i)} 100\n")
EOF

# 3. Binarise (joined dictionary).
rm -rf "$OUT_DIR/data-bin"
"$BIN/fairseq-preprocess" --source-lang en --target-lang de \
  --trainpref "$OUT_DIR/spm/train" --validpref "$OUT_DIR/spm/val" \
  --testpref "$OUT_DIR/spm/test_2016_flickr" --destdir "$OUT_DIR/data-bin" \
  --joined-dictionary --srcdict "$OUT_DIR/dict.txt" --workers 2

# 4. Train.
extra=()
if [[ -n ${MAX_UPDATE:-} ]]; then
  extra+=(--max-update "$MAX_UPDATE")
fi
"$BIN/fairseq-train" "$OUT_DIR/data-bin" --arch transformer --share-all-embeddings \
  --encoder-layers 3 --decoder-layers 3 \
  --encoder-embed-dim 256 --decoder-embed-dim 256 \
  --encoder-ffn-embed-dim 1024 --decoder-ffn-embed-dim 1024 \
  --encoder-attention-heads 4 --decoder-attention-heads 4 \
  --dropout 0.3 --attention-dropout 0.1 \
  --criterion label_smoothed_cross_entropy --label-smoothing 0.1 \
  --optimizer adam --adam-betas '(0.9,0.98)' \
  --lr 1.5e-3 --lr-scheduler inverse_sqrt --warmup-updates 400 \
  --max-tokens "$MAX_TOKENS" --max-epoch "$MAX_EPOCH" \
  --save-dir "$OUT_DIR/ckpt" --no-epoch-checkpoints --seed 1 --num-workers 0 \
  "${extra[@]}"

# 5. The shared model's layout: model-only checkpoint beside its dictionaries.
"$PYTHON" - "$OUT_DIR" <<'EOF'
import sys
from pathlib import Path

import torch

out = Path(sys.argv[1])
state = torch.load(out / "ckpt" / "checkpoint_best.pt", map_location="cpu", weights_only=False)
state.pop("last_optimizer_state", None)
torch.save(state, out / "checkpoint_best.pt")
EOF
cp "$OUT_DIR/data-bin/dict.en.txt" "$OUT_DIR/data-bin/dict.de.txt" "$OUT_DIR/"
rm -rf "$OUT_DIR/ckpt"
echo "model written to $OUT_DIR (checkpoint_best.pt, dict.*.txt, spm8k.model, data-bin/)"
