# Sourced by the launch scripts: a virtual environment with torch first, then fitdist, and the
# Fashion-MNIST IDX files from the Debian package where apt-get is available.
VENV="${VENV:-.venv}"
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
pip_install() {  # quiet, without the notes some pip configurations print for every package
  "$VENV/bin/python" -m pip install -q "$@" 2> >(grep -v "^WARNING: Location" >&2)
}
# torch first, from the versions this project is tested with; then fitdist and its extras
pip_install "torch==2.14.1" "torchvision==0.29.1"
pip_install -e ".[${FITDIST_EXTRAS:-dev}]"
if [ ! -d /usr/share/datasets/fashion-mnist ] && command -v apt-get >/dev/null; then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo -n"
  { $SUDO apt-get update -qq && $SUDO apt-get install -y -qq dataset-fashion-mnist; } >/dev/null 2>&1 \
    || echo "note: could not install dataset-fashion-mnist; fitdist will try torchvision's downloader" >&2
fi
