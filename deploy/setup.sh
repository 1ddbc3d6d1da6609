#!/usr/bin/env bash
# Prepare a Prefect server for fastimagic and deploy its flows. Safe to run again (after a code change, say).
#
#   deploy/setup.sh [GPU_SLOTS]
#
# 1. the process work pools fastimagic-cpu and fastimagic-gpu (left as they are if they exist);
# 2. the concurrency limit on the task tag `gpu`: GPU_SLOTS renders at once across all workers (argument, else
#    $FASTIMAGIC_GPU_SLOTS, else 1: one per GPU you have; `prefect concurrency-limit create` updates an existing
#    limit, so rerun with a new number when you add GPUs);
# 3. every deployment in deploy/prefect.yaml (`prefect deploy --all`), skipping, with a warning, any whose
#    entrypoint file is not in this checkout yet.
#
# Talks to the server in PREFECT_API_URL (or the active Prefect profile's), e.g. http://localhost:4200/api.
set -euo pipefail

cd "$(dirname "$0")/.."   # the repository root: entrypoints in prefect.yaml are relative to it

PREFECT_FILE=deploy/prefect.yaml
CPU_POOL=fastimagic-cpu
GPU_POOL=fastimagic-gpu
GPU_TAG=gpu
GPU_SLOTS="${1:-${FASTIMAGIC_GPU_SLOTS:-1}}"

if ! [[ "$GPU_SLOTS" =~ ^[1-9][0-9]*$ ]]; then
  echo "setup.sh: GPU_SLOTS must be a positive whole number, got '$GPU_SLOTS'" >&2
  exit 2
fi

api_url="$(python -c 'from prefect.settings import PREFECT_API_URL; print(PREFECT_API_URL.value() or "")')"
if [[ -z "$api_url" ]]; then
  echo "setup.sh: no Prefect server configured: export PREFECT_API_URL=http://localhost:4200/api" >&2
  echo "          (without one, Prefect would use a throw-away local server and nothing would stay deployed)" >&2
  exit 2
fi
echo "Prefect server: $api_url"

for pool in "$CPU_POOL" "$GPU_POOL"; do
  if prefect work-pool inspect "$pool" >/dev/null 2>&1; then
    echo "work pool $pool: already exists, left as it is"
  else
    prefect work-pool create "$pool" --type process
  fi
done

prefect concurrency-limit create "$GPU_TAG" "$GPU_SLOTS"

# Deploy what this checkout can: a deployment whose entrypoint file is missing would stop `prefect deploy --all`.
mapfile -t names < <(python - "$PREFECT_FILE" <<'EOF'
import sys
from pathlib import Path

import yaml

for d in yaml.safe_load(Path(sys.argv[1]).read_text())["deployments"]:
    path = d["entrypoint"].split(":", 1)[0]
    if Path(path).is_file():
        print(d["name"])
    else:
        print(f"setup.sh: skipping deployment '{d['name']}': {path} is not in this checkout", file=sys.stderr)
EOF
)
total="$(python -c 'import sys, yaml; print(len(yaml.safe_load(open(sys.argv[1]))["deployments"]))' "$PREFECT_FILE")"

if [[ "${#names[@]}" -eq "$total" ]]; then
  prefect deploy --all --prefect-file "$PREFECT_FILE" --no-prompt
elif [[ "${#names[@]}" -gt 0 ]]; then
  args=()
  for name in "${names[@]}"; do args+=(--name "$name"); done
  prefect deploy "${args[@]}" --prefect-file "$PREFECT_FILE" --no-prompt
else
  echo "setup.sh: no deployment to create" >&2
  exit 1
fi

echo
echo "Done. Start workers (deploy/docker-compose.yml does):"
echo "  FASTIMAGIC_HOME=$PWD prefect worker start --pool $CPU_POOL --type process"
echo "  FASTIMAGIC_HOME=$PWD prefect worker start --pool $GPU_POOL --type process --limit 1   # one per GPU"
