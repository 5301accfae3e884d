# Sourced by scripts/gpu-*.sh on the GPU machine, from the repository root: install the carried
# wheels (.whl: the wheelhouse, .gpu: this repository's wheel) into $SITE (a fresh temporary
# folder unless set) and put them on PYTHONPATH ahead of the checkout's src.
export SITE=${SITE:-$(mktemp -d)}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target "$SITE" .whl/*.whl .gpu/*.whl >/dev/null 2>&1 \
  || { echo "could not install .whl/*.whl .gpu/*.whl into $SITE" >&2; exit 1; }
export PYTHONPATH=$SITE:$PWD/src HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
