#!/usr/bin/env bash
# Prepare a Prefect server for fastimagic and deploy its flows. Safe to run again (after a code change, say).
#
#   deploy/setup.sh
#
# 1. the process work pool fastimagic-cpu (left as it is if it exists): the storyboard flow and the inbox;
# 2. the result-storage block s3-bucket/fastimagic-results (created or updated): warm GPU workers and the flows
#    that submit to them exchange parameters and results through it, in $FASTIMAGIC_RESULTS_BUCKET (default
#    fastimagic-results) under prefect-results/, with the AWS_* credentials and AWS_ENDPOINT_URL of this
#    environment. Keep that bucket apart from the inbox's: only the operator's workers and flows may write it;
# 3. no `gpu` tag concurrency limit: each warm worker runs one task at a time on its own GPU, so a limit would only
#    make every GPU task wait for a slot (an older setup's limit is removed);
# 4. every deployment in deploy/prefect.yaml (`prefect deploy --all`), skipping, with a warning, any whose
#    entrypoint file is not in this checkout yet.
#
# GPU workers are not a work pool: start one `fastimagic worker` per GPU (docker-compose.yml and
# k8s/gpu-workers.yaml do), with PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK=s3-bucket/fastimagic-results.
#
# Talks to the server in PREFECT_API_URL (or the active Prefect profile's), e.g. http://localhost:4200/api.
set -euo pipefail

cd "$(dirname "$0")/.."   # the repository root: entrypoints in prefect.yaml are relative to it

PREFECT_FILE=deploy/prefect.yaml
CPU_POOL=fastimagic-cpu
GPU_TAG=gpu
RESULTS_BLOCK=fastimagic-results

api_url="$(python -c 'from prefect.settings import PREFECT_API_URL; print(PREFECT_API_URL.value() or "")')"
if [[ -z "$api_url" ]]; then
  echo "setup.sh: no Prefect server configured: export PREFECT_API_URL=http://localhost:4200/api" >&2
  echo "          (without one, Prefect would use a throw-away local server and nothing would stay deployed)" >&2
  exit 2
fi
echo "Prefect server: $api_url"

for pool in "$CPU_POOL"; do
  if prefect work-pool inspect "$pool" >/dev/null 2>&1; then
    echo "work pool $pool: already exists, left as it is"
  else
    prefect work-pool create "$pool" --type process
  fi
done

python - "$RESULTS_BLOCK" "$GPU_TAG" <<'EOF'
import os
import sys

from prefect.client.orchestration import get_client
from prefect.exceptions import ObjectNotFound
from prefect_aws import MinIOCredentials, S3Bucket
from prefect_aws.client_parameters import AwsClientParameters

block, tag = sys.argv[1:]
missing = [v for v in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY") if not os.environ.get(v)]
if missing:
    sys.exit(f"setup.sh: {', '.join(missing)} not set: the result-storage block needs the S3 credentials")
endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
S3Bucket(
    bucket_name=os.environ.get("FASTIMAGIC_RESULTS_BUCKET", "fastimagic-results"),
    bucket_folder="prefect-results",
    credentials=MinIOCredentials(
        minio_root_user=os.environ["AWS_ACCESS_KEY_ID"],
        minio_root_password=os.environ["AWS_SECRET_ACCESS_KEY"],
        region_name=os.environ.get("AWS_DEFAULT_REGION", "us-east-1"),
        aws_client_parameters=AwsClientParameters(endpoint_url=endpoint) if endpoint else AwsClientParameters(),
    ),
).save(block, overwrite=True)
print(f"result storage: s3-bucket/{block} (workers: PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK=s3-bucket/{block})")
with get_client(sync_client=True) as client:
    try:
        client.delete_concurrency_limit_by_tag(tag)
        print(f"removed the concurrency limit on tag {tag!r}: warm workers take one task per GPU themselves")
    except ObjectNotFound:
        pass
EOF

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
echo "  PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK=s3-bucket/$RESULTS_BLOCK CUDA_VISIBLE_DEVICES=0 fastimagic worker  # per GPU"
