#!/usr/bin/env bash
# Download, into .whl/ (git-ignored), the wheels that the GPU machine's image lacks for
# tools/benchmark.py and launch.py on synthetic data. Run it HERE (it needs PyPI); carry .whl to
# the GPU machine, where tools/gpu_bench.sh installs them into /tmp/site.
#
#   bash tools/prepare_gpu_wheels.sh          # versions taken from .venv, so the GPU runs what
#                                             # the tests here ran
#
# The GPU image (Python 3.12, jax 0.11, flax, optax, orbax, absl-py, typing-extensions, pyyaml,
# protobuf, numpy, tqdm, tiktoken, einops, pillow) lacks:
#   fiddle        experiments are Fiddle configs; Requires-Dist: absl-py, graphviz, libcst,
#                 typing-extensions
#   graphviz      pure Python (fiddle's graph printer; the dot binary is not needed)
#   libcst        imported by fiddle; compiled: the cp312 manylinux x86_64 wheel; needs pyyaml
# Pure-Python wheels (py3-none-any) match the platform flags too.
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=.whl
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
PACKAGES=(fiddle graphviz libcst)
DEFAULTS=(fiddle==0.3.1 graphviz==0.21 libcst==1.9.0)

grep -qxF '/.whl/' .gitignore 2>/dev/null || grep -qxF '/.whl/' .git/info/exclude 2>/dev/null \
  || echo '/.whl/' >> .git/info/exclude
mkdir -p "$DEST"

specs=()
for i in "${!PACKAGES[@]}"; do
  name=${PACKAGES[$i]}
  version=$("$PY" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" \
            "$name" 2>/dev/null || true)
  spec=${version:+$name==$version}
  spec=${spec:-${DEFAULTS[$i]}}
  specs+=("$spec")
  # One version of each (two would stop the whole install there): drop other versions.
  find "$DEST" -maxdepth 1 -iname "${name}-*.whl" ! -iname "${name}-${spec#*==}-*" -delete
done

for spec in "${specs[@]}"; do
  python3 -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: \
    --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform manylinux1_x86_64 \
    -d "$DEST" "$spec"
done

python3 - "$DEST" <<'PY'
import glob, os, sys, zipfile
total = 0
print(f'wheels in {sys.argv[1]}:')
for path in sorted(glob.glob(os.path.join(sys.argv[1], '*.whl'))):
  size = os.path.getsize(path)
  total += size
  print(f'  {os.path.basename(path):70s} {size / 1024:9.1f} KiB')
  with zipfile.ZipFile(path) as z:
    meta = next(n for n in z.namelist() if n.endswith('.dist-info/METADATA'))
    for line in z.read(meta).decode().splitlines():
      if line.startswith('Requires-Dist') and 'extra ==' not in line:
        print('      ' + line)
print(f'total {total / 2**20:.1f} MiB')
PY
