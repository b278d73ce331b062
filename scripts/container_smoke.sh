#!/usr/bin/env bash
# Build the image and bring up docker-compose.yml with podman, then check the container:
# create a session, step it, restart the container, and find the session intact on the
# named volume. Used by CI; needs podman (../shared/tools/podman-env.sh sets it up).
set -euo pipefail
cd "$(dirname "$0")/.."

port=${SMOKE_PORT:-18731}
key=smoke-key-$$
project=optserve-smoke
export OPTSERVE_API_KEYS="smoke:$key" OPTSERVE_PUBLISH_PORT=$port
# Docker image format, so the HEALTHCHECK is kept (the OCI format has no such field).
export BUILDAH_FORMAT=docker
url="http://127.0.0.1:$port"
auth=(-H "Authorization: Bearer $key")

cleanup() {
  podman-compose -p "$project" down -v >/dev/null 2>&1 || true
}
trap cleanup EXIT

wait_healthy() {
  for _ in $(seq 1 60); do
    curl -fsS "$url/healthz" >/dev/null 2>&1 && return 0
    sleep 1
  done
  echo "container did not become healthy" >&2
  podman-compose -p "$project" logs >&2 || true
  return 1
}

echo "== hadolint"
hadolint Dockerfile

echo "== build and start"
podman-compose -p "$project" up -d --build
wait_healthy

echo "== create and step"
created=$(curl -fsS "${auth[@]}" -H 'Content-Type: application/json' "$url/v1/sessions" -d '{
  "optimizer": {"name": "SGD", "lr": 0.5},
  "params": {"w": {"shape": [2], "data": [1.0, 2.0]}}
}')
id=$(python3 -c 'import json,sys; print(json.load(sys.stdin)["id"])' <<<"$created")
curl -fsS "${auth[@]}" -H 'Content-Type: application/json' "$url/v1/sessions/$id/step" \
  -d '{"grads": {"w": [1.0, -1.0]}}' >/dev/null

echo "== restart"
podman-compose -p "$project" restart
wait_healthy

doc=$(curl -fsS "${auth[@]}" "$url/v1/sessions/$id")
params=$(curl -fsS "${auth[@]}" -H 'Accept: application/json' "$url/v1/sessions/$id/params")
python3 - "$doc" "$params" <<'PY'
import json, sys
doc, params = json.loads(sys.argv[1]), json.loads(sys.argv[2])
assert doc["step"] == 1, doc
values = params.get("params", params)["w"]
assert values == [0.5, 2.5], values
print("session intact after restart:", doc["id"], "step", doc["step"], "params", values)
PY
