#!/usr/bin/env bash
# The REST API with curl: one agent session created, extended, generated from, snapshotted,
# forked, rolled back, restored and deleted. Start a server first, then run this script:
#   agentos serve --port 8000 &
#   AGENTOS_URL=http://127.0.0.1:8000 bash examples/rest_quickstart.sh
# A server with API keys needs AGENTOS_API_KEY set too (sent as a Bearer token).
set -euo pipefail

URL=${AGENTOS_URL:-http://127.0.0.1:8000}
HEADERS=(-H "Content-Type: application/json")
if [[ -n ${AGENTOS_API_KEY:-} ]]; then HEADERS+=(-H "Authorization: Bearer $AGENTOS_API_KEY"); fi

# call METHOD PATH [curl args]: the JSON answer on stdout; exits on an HTTP error, printing it
call() {
  local method=$1 path=$2
  shift 2
  curl -sS --fail-with-body -X "$method" "${HEADERS[@]}" "$URL$path" "$@"
}

# field PATH: one value of the JSON on stdin, by a dotted path ("id", "data.0.id")
field() {
  python3 -c 'import sys, json
v = json.load(sys.stdin)
for k in sys.argv[1].split("."):
    v = v[int(k)] if isinstance(v, list) else v[k]
print(v)' "$1"
}

main() {
  # 0. the server is up
  curl -sS --fail "$URL/health" && echo

  # 1. a session from a prompt (BOS is prepended); its id names it from now on
  sid=$(call POST /v1/sessions -d '{"prompt": "Plan: find the failing test."}' | field id)
  echo "session $sid"

  # 2. tool output appended: given tokens (mask 0), not the model's
  call POST "/v1/sessions/$sid/append" -d '{"text": "\n[tool] pytest: 1 failed\n"}' && echo

  # 3. generate 8 tokens (ignore_eos: the random-weight tiny model's EOS means nothing)
  call POST "/v1/sessions/$sid/generate" \
    -d '{"max_tokens": 8, "temperature": 0.8, "seed": 1, "ignore_eos": true}' && echo

  # 4. the same, streamed: server-sent events, one per token, then one with finish_reason
  call POST "/v1/sessions/$sid/generate" -N \
    -d '{"max_tokens": 4, "temperature": 0.8, "ignore_eos": true, "stream": true}'

  # 5. a snapshot: immutable, outlives the session until deleted
  snap=$(call POST "/v1/sessions/$sid/snapshots" | field id)
  echo "snapshot $snap"

  # 6. fork n=2: two children sharing the parent's KV pages copy-on-write
  kids=$(call POST "/v1/sessions/$sid/fork" -d '{"n": 2}' |
    python3 -c 'import sys, json; print(" ".join(s["id"] for s in json.load(sys.stdin)["data"]))')
  echo "children $kids"

  # 7. the parent goes on, then rolls back to the snapshot: tokens, pages and RNG restored
  call POST "/v1/sessions/$sid/generate" -d '{"max_tokens": 8, "ignore_eos": true}' >/dev/null
  call POST "/v1/sessions/$sid/rollback" -d "{\"snapshot_id\": \"$snap\"}" && echo

  # 8. a new session restored from the snapshot
  restored=$(call POST "/v1/snapshots/$snap/restore" | field id)
  echo "restored $restored"

  # 9. its tokens, per-token mask (1 = generated) and text
  call GET "/v1/sessions/$restored/tokens" && echo

  # 10. clean up: the snapshot, then every session
  call DELETE "/v1/snapshots/$snap" && echo
  for id in "$sid" $kids "$restored"; do
    call DELETE "/v1/sessions/$id" && echo
  done
}

main "$@"
