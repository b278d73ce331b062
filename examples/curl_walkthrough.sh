#!/usr/bin/env bash
# A walk through the optserve HTTP API with curl and jq: create a session, step it,
# replay a step by its Idempotency-Key, refuse a stale If-Match, read the problem
# document of a bad request, export a checkpoint and restore it, hold parameters on the
# server, preview a schedule, delete. Every answer is checked; the script stops at the
# first surprise.
#
#   optserve serve &                         # or any running server
#   bash examples/curl_walkthrough.sh --url http://127.0.0.1:8000 [--api-key KEY]
set -euo pipefail

URL="${OPTSERVE_URL:-http://127.0.0.1:8000}"
API_KEY="${OPTSERVE_API_KEY:-}"
while [ $# -gt 0 ]; do
  case "$1" in
    --url) URL="$2"; shift 2 ;;
    --api-key) API_KEY="$2"; shift 2 ;;
    *) echo "usage: $0 [--url URL] [--api-key KEY]" >&2; exit 2 ;;
  esac
done
URL="${URL%/}"

WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
AUTH=()
if [ -n "$API_KEY" ]; then AUTH=(-H "Authorization: Bearer $API_KEY"); fi

# api METHOD PATH [curl args...]: body to $WORK/body, headers to $WORK/headers, prints status.
api() {
  local method="$1" path="$2"
  shift 2
  curl -sS -X "$method" "${AUTH[@]}" -D "$WORK/headers" -o "$WORK/body" \
    -w '%{http_code}' "$@" "$URL$path"
}
expect() {  # expect STATUS ACTUAL WHAT
  if [ "$1" != "$2" ]; then
    echo "FAILED: $3: expected HTTP $1, got $2" >&2
    cat "$WORK/body" >&2; echo >&2
    exit 1
  fi
  echo "ok  $3 ($2)"
}
check() {  # check JQ_EXPRESSION WHAT: the body must satisfy the expression
  if ! jq -e "$1" "$WORK/body" > /dev/null; then
    echo "FAILED: $2: body does not satisfy $1" >&2
    cat "$WORK/body" >&2; echo >&2
    exit 1
  fi
}
header() { grep -i "^$1:" "$WORK/headers" | head -n1 | cut -d' ' -f2- | tr -d '\r'; }

echo "== health"
expect 200 "$(api GET /healthz)" "GET /healthz"

echo "== create a session: AdamW, warmup then cosine, a no-decay group for the bias"
status=$(api POST /v1/sessions -H 'Content-Type: application/json' --data-binary @- <<'JSON'
{
  "optimizer": {"name": "AdamW", "lr": 0.01, "weight_decay": 0.1},
  "schedule": {"name": "SequentialLR", "milestones": [2], "schedulers": [
    {"name": "LinearLR", "start_factor": 0.5, "total_iters": 2},
    {"name": "CosineAnnealingLR", "T_max": 8}]},
  "params": {"w": {"shape": [2, 2]}, "b": {"shape": [2]}},
  "param_groups": [{"params": ["b"], "weight_decay": 0.0}],
  "clip_grad_norm": {"max_norm": 1.0},
  "dtype": "float64",
  "labels": {"example": "curl"}
}
JSON
)
expect 201 "$status" "POST /v1/sessions"
ID=$(jq -r .id "$WORK/body")
check '.step == 0 and (.lr | length) == 2 and .optimizer.betas == [0.9, 0.999]' "defaults filled in"
check '.needs_params == true' "weight decay reads the parameters"
echo "    session $ID, location $(header location), lr $(jq -c .lr "$WORK/body")"

echo "== one step: gradients and current parameters in, deltas out"
STEP='{"grads": {"w": [[0.1, -0.2], [0.3, 0.4]], "b": [1.0, -1.0]},
       "params": {"w": [[1.0, 2.0], [3.0, 4.0]], "b": [0.0, 0.0]}, "loss": 0.5}'
status=$(api POST "/v1/sessions/$ID/step" -H 'Content-Type: application/json' \
  -H 'Idempotency-Key: walkthrough-step-1' --data-binary "$STEP")
expect 200 "$status" "POST .../step"
check '.step == 1 and .applied == true and (.deltas.w | length) == 2' "a step reply"
cp "$WORK/body" "$WORK/first-reply"
echo "    deltas $(jq -c .deltas "$WORK/body"), ETag $(header etag)"

echo "== the same request again (a client retry): replayed, not applied twice"
status=$(api POST "/v1/sessions/$ID/step" -H 'Content-Type: application/json' \
  -H 'Idempotency-Key: walkthrough-step-1' --data-binary "$STEP")
expect 200 "$status" "retry with the same Idempotency-Key"
[ "$(header idempotent-replayed)" = "true" ] || { echo "FAILED: no Idempotent-Replayed" >&2; exit 1; }
cmp -s "$WORK/body" "$WORK/first-reply" || { echo "FAILED: replay differs" >&2; exit 1; }
expect 200 "$(api GET "/v1/sessions/$ID")" "GET the session"
check '.step == 1' "still at step 1"

echo "== If-Match with a step the session has left: 412 with the current ETag"
status=$(api POST "/v1/sessions/$ID/step" -H 'Content-Type: application/json' \
  -H 'If-Match: "0"' --data-binary "$STEP")
expect 412 "$status" "stale If-Match"
echo "    current ETag $(header etag)"

echo "== a bad hyperparameter: a problem document naming the field"
status=$(api POST /v1/sessions -H 'Content-Type: application/json' \
  --data-binary '{"optimizer": {"name": "Adam", "betas": [1.5, 0.999]}, "params": {"x": {"shape": [1]}}}')
expect 422 "$status" "betas out of range"
check '.errors[0].field == "optimizer.betas" and (.type | endswith("invalid-hyperparameter"))' \
  "problem document"
echo "    $(jq -r '.errors[0].message' "$WORK/body")"

echo "== export a checkpoint and restore it as a new session"
expect 200 "$(api GET "/v1/sessions/$ID/state" -H 'Accept: application/vnd.optserve.safetensors')" \
  "GET .../state"
cp "$WORK/body" "$WORK/checkpoint.safetensors"
status=$(api POST /v1/sessions -H 'Content-Type: application/vnd.optserve.safetensors' \
  --data-binary @"$WORK/checkpoint.safetensors")
expect 201 "$status" "POST the checkpoint"
RESTORED=$(jq -r .id "$WORK/body")
check '.step == 1' "the restored session continues at step 1"
for session in "$ID" "$RESTORED"; do
  api POST "/v1/sessions/$session/step" -H 'Content-Type: application/json' \
    --data-binary "$STEP" > /dev/null
  jq -c .deltas "$WORK/body" > "$WORK/next-$session"
done
cmp -s "$WORK/next-$ID" "$WORK/next-$RESTORED" || { echo "FAILED: restored run differs" >&2; exit 1; }
echo "ok  original and restored sessions take the identical next step"

echo "== a session that holds its parameters (a parameter server)"
status=$(api POST /v1/sessions -H 'Content-Type: application/json' --data-binary \
  '{"optimizer": {"name": "SGD", "lr": 0.5}, "params": {"x": {"shape": [3], "data": [1, 2, 3]}}}')
expect 201 "$status" "create with data"
HELD=$(jq -r .id "$WORK/body")
status=$(api POST "/v1/sessions/$HELD/step?return=params" -H 'Content-Type: application/json' \
  --data-binary '{"grads": [2, 2, 2]}')
expect 200 "$status" "step with a bare gradient, return=params"
check '.params.x == [0, 1, 2]' "new values"
expect 200 "$(api GET "/v1/sessions/$HELD/params")" "GET .../params"
check '.params.x == [0, 1, 2]' "held values"

echo "== preview a schedule and list the catalog"
status=$(api POST /v1/schedules/preview -H 'Content-Type: application/json' --data-binary \
  '{"optimizer": {"name": "SGD", "lr": 1.0}, "schedule": {"name": "StepLR", "step_size": 2}, "steps": 4}')
expect 200 "$status" "POST /v1/schedules/preview"
echo "    lr per step: $(jq -c . "$WORK/body")"
expect 200 "$(api GET /v1/optimizers)" "GET /v1/optimizers"
echo "    $(jq -r '[.. | objects | select(has("args")) | .name] | join(", ")' "$WORK/body")"

echo "== delete"
for session in "$ID" "$RESTORED" "$HELD"; do
  expect 204 "$(api DELETE "/v1/sessions/$session")" "DELETE $session"
done
expect 404 "$(api GET "/v1/sessions/$ID")" "a deleted session is gone"
echo "walkthrough complete"
