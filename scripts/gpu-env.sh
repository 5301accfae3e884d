# Sourced by scripts/gpu-*.sh on the GPU machine, from the repository root: install the carried
# wheels (.whl: the wheelhouse, .gpu: this repository's wheel) into $SITE (a fresh temporary
# folder unless set) and put them on PYTHONPATH ahead of the checkout's src. A script sourced by
# another one (gpu-archs.sh beside gpu-regress.sh's tests) finds $SITE installed and leaves it:
# reinstalling with --upgrade would delete the package under the running tests.
export SITE=${SITE:-$(mktemp -d)}
if [ ! -e "$SITE/.gpu-env-installed" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$SITE" .whl/*.whl .gpu/*.whl >/dev/null 2>&1 \
    || { echo "could not install .whl/*.whl .gpu/*.whl into $SITE" >&2; exit 1; }
  touch "$SITE/.gpu-env-installed"
fi
export PYTHONPATH=$SITE:$PWD/src HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
