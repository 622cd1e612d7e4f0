#!/usr/bin/env bash
# The GPU check of docs/gpus.md, in two steps:
#   bash benchmarks/gpu_check.sh prepare   here, once: the wheels the GPU machine lacks, into .whl/ (git-ignored)
#   bash benchmarks/gpu_check.sh run       there, with .whl carried: install them, run benchmarks/gpu_check.py,
#                                          figures to $OUT/gpu_check.json and the whole log to $OUT/gpu_check.log
# The GPU machine has Python 3.12 and torch 2.11 (with CUDA) but no Hydra (the recipes are composed with it)
# and no dvclive (the Trainer logs through it), which needs dvc at import. WHEELS is that closure for
# Python 3.12, less what the machine already has (/work/.library/device/KINDS.md); about 19 MB.
set -euo pipefail
cd "$(dirname "$0")/.."

WHEELS=(
  aiohttp-retry==2.9.1 amqp==5.4.2 annotated-types==0.8.0 appdirs==1.4.4 asyncssh==2.24.1 atpublic==9.0.0
  billiard==4.3.2 celery==5.7.0 cffi==2.1.1 click-didyoumean==0.3.1 click-plugins==1.1.1.2 click-repl==0.4.1
  configobj==5.0.9 cryptography==50.0.2 dictdiffer==0.10.0 diskcache==5.6.3 distro==1.9.0 dpath==2.2.0
  dulwich==1.2.21 dvc==3.67.1 dvc-data==3.18.3 dvc-http==2.32.0 dvc-objects==5.2.0 dvc-render==1.0.2
  dvc-studio-client==0.23.0 dvc-task==0.40.2 dvclive==3.49.1 entrypoints==0.4.2 flatten-dict==0.5.0
  flufl-lock==9.2.0 funcy==2.1 gitdb==4.0.12 gitpython==3.2.1 grandalf==0.8 gto==1.10.1 hydra-core==1.3.8
  iterative-telemetry==0.0.10 kombu==5.7.0 omegaconf==2.3.1 orjson==3.13.0 platformdirs==4.14.9
  prompt-toolkit==3.0.53 pycparser==3.12 pydantic==2.14.4 pydantic-core==2.50.5 pydantic-settings==2.16.3
  pydot==4.0.1 pygit2==1.21.0 pygtrie==2.6.2 python-dotenv==1.2.4 ruamel-yaml==0.19.1 scmrepo==3.6.2
  semver==3.1.2 shortuuid==1.0.13 shtab==1.13.0 smmap==5.0.3 sqltrie==0.11.3 tomlkit==0.15.2
  typing-inspection==0.4.5 tzlocal==5.4.5 vine==5.1.0 voluptuous==0.16.0 wcwidth==0.9.4 zc-lockfile==4.0
)
# omegaconf 2.3 needs antlr4-python3-runtime 4.9.*, which PyPI has as a source archive only: build it
# here (pure Python, so the wheel serves any Python 3).
SOURCE_ONLY=antlr4-python3-runtime==4.9.3
PLATFORMS=(manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_26_x86_64 manylinux_2_17_x86_64
           manylinux2014_x86_64 manylinux1_x86_64)

prepare() {
  local python=${PYTHON:-python3} exclude
  exclude=$(git rev-parse --git-path info/exclude)
  mkdir -p "$(dirname "$exclude")"
  grep -qxF '/.whl/' "$exclude" 2>/dev/null || echo '/.whl/' >>"$exclude"  # never committed, still carried
  rm -rf .whl
  "$python" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${PLATFORMS[@]/#/--platform=}" -d .whl "${WHEELS[@]}"
  "$python" -m pip wheel -q --no-deps -w .whl "$SOURCE_ONLY"
  echo "prepared .whl/: $(ls .whl | wc -l) wheels, $(du -sh .whl | cut -f1); carry it: run(carry=[\".whl\"])"
}

run() {
  : "${OUT:?is not set: run this on the GPU machine (docs/gpus.md), or benchmarks/gpu_check.py --dry here}"
  if ! compgen -G ".whl/*.whl" >/dev/null; then
    echo "error: .whl/ holds no wheels. Fix: run 'bash benchmarks/gpu_check.sh prepare' here first and carry .whl" >&2
    exit 2
  fi
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
  python3 benchmarks/gpu_check.py --out "$OUT/gpu_check.json" "$@" 2>&1 | tee "$OUT/gpu_check.log"
}

case "${1:-}" in
  prepare) prepare ;;
  run) shift; run "$@" ;;
  *) echo "usage: bash benchmarks/gpu_check.sh prepare | run [gpu_check.py options]" >&2; exit 2 ;;
esac
