# Sourced by the launch scripts: a virtual environment with torch first, then fitdist, and the
# Fashion-MNIST IDX files from the Debian package where apt-get is available.
VENV="${VENV:-.venv}"
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
# torch first, from the versions this project is tested with; then fitdist and its extras
"$VENV/bin/python" -m pip install -q --upgrade pip >/dev/null
"$VENV/bin/python" -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
"$VENV/bin/python" -m pip install -q -e ".[${FITDIST_EXTRAS:-dev}]"
if [ ! -d /usr/share/datasets/fashion-mnist ] && command -v apt-get >/dev/null; then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo -n"
  { $SUDO apt-get update -qq && $SUDO apt-get install -y -qq dataset-fashion-mnist; } >/dev/null 2>&1 \
    || echo "note: could not install dataset-fashion-mnist; fitdist will try torchvision's downloader" >&2
fi
