#!/usr/bin/env bash
# One install step for everything: builds .venv with torch, mmcv (compiled ops), mmdet and damex.
# Safe to re-run: when setup.py and this script are unchanged it returns in seconds.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${DAMEX_VENV:-.venv}
PY="$VENV/bin/python"
STAMP="$VENV/.damex-install-stamp"
want_stamp=$(cat setup.py tools/install.sh | sha256sum | cut -d' ' -f1)

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want_stamp" ] && "$PY" -c 'import damex, mmcv.ops' 2>/dev/null; then
  echo "[install] $VENV is up to date"
  exit 0
fi

if [ ! -x "$PY" ]; then
  echo "[install] creating virtual environment $VENV"
  python3 -m venv "$VENV"
fi
pip_install() { "$PY" -m pip install --disable-pip-version-check "$@"; }

# torch: keep an installed torch < 2.14 (mmcv 2.1.0 does not build against 2.14), else take 2.13.0.
if "$PY" -c 'import sys, torch; v = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2]); sys.exit(0 if (2, 1) <= v < (2, 14) else 1)' 2>/dev/null; then
  echo "[install] keeping torch $("$PY" -c 'import torch; print(torch.__version__)')"
else
  echo "[install] installing torch 2.13.0"
  pip_install torch==2.13.0
fi

echo "[install] build tools"
pip_install 'setuptools<82' wheel ninja

if "$PY" -c 'import mmcv, mmcv.ops; assert mmcv.__version__ == "2.1.0"' 2>/dev/null; then
  echo "[install] mmcv 2.1.0 with compiled ops is present"
else
  echo "[install] building mmcv 2.1.0 with its compiled ops from source."
  echo "[install] The first build on a machine takes ~20-25 minutes on 2 cores; pip caches the wheel, so later installs take seconds."
  MMCV_WITH_OPS=1 MAX_JOBS=${MAX_JOBS:-$(nproc)} pip_install --no-build-isolation mmcv==2.1.0
fi

echo "[install] mmdet, the remaining dependencies and damex (editable)"
pip_install --no-build-isolation -e '.[tests]'
"$PY" -c 'import damex, mmcv.ops, mmdet; print("[install] ok: damex", damex.__version__, "mmdet", mmdet.__version__)'
echo "$want_stamp" > "$STAMP"
