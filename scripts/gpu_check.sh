#!/usr/bin/env bash
# The GPU check: every part the accelerator must show, in one command (under 8 minutes on
# an H100/H200), writing DIR/gpu_check.json and DIR/gpu_check.txt. See scripts/gpu_check.py.
#
#   bash scripts/gpu_check.sh [--out DIR] [--parts a,b] [--dry-run]
#
# The GPU machine is expected to have no network: it needs, installed beforehand, torch
# with CUDA, triton (for the Triton attention) and transformers (the peer of the decode
# benchmarks), plus this project's runtime dependencies. The project itself need not be
# installed: when `agentos.kernel` does not import, it is installed (without dependencies)
# into a temporary folder first. `--dry-run` runs every part on the CPU with small shapes.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python3}"
DRY=0
for a in "$@"; do [ "$a" = "--dry-run" ] && DRY=1; done

missing="$("$PY" - "$DRY" <<'PY'
import importlib.util, sys
dry = sys.argv[1] == "1"
need = ["torch", "transformers", "numpy", "safetensors", "tokenizers", "rich"] + ([] if dry else ["triton"])
gone = [m for m in need if importlib.util.find_spec(m) is None]
if not gone and not dry:
    import torch
    if not torch.cuda.is_available():
        gone.append("a CUDA device (torch.cuda.is_available() is False)")
print(", ".join(gone))
PY
)"
if [ -n "$missing" ]; then
    echo "gpu_check: missing $missing; install torch with CUDA, triton and transformers first (no network is expected here)" >&2
    exit 2
fi

# the package maps agentos.kernel etc. onto top-level folders: import it installed
if ! (cd /tmp && "$PY" -c "import agentos.kernel" 2>/dev/null); then
    SITE="$(mktemp -d)"
    "$PY" -m pip install -q --no-deps --no-build-isolation --no-compile --target "$SITE" "$ROOT" >&2
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
cd /tmp
exec "$PY" "$ROOT/scripts/gpu_check.py" --out "$ROOT/gpu_check_out" "$@"
