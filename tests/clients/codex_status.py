"""Codex's /status quota, read by the real Codex through turnpike (docs/DESIGN.md#codex-usage).

Codex asks `{chatgpt_base_url}/wham/usage` when signed in with ChatGPT; its app server serves
the same data as `account/rateLimits/read`. This signs Codex in with ChatGPT-style tokens whose
access token is a turnpike key (the id token is unsigned: Codex reads its claims, the relay never
sees it), bills one turn with that key, and checks that Codex reads the key's quota used and the
user's balance as the relay computes them.

python codex_status.py CODEX_BIN RELAY_ADDR KEY WORK_DIR DB_PATH QUOTA_NANOUSD BALANCE_NANOUSD
"""

import base64
import decimal
import json
import math
import os
import sqlite3
import subprocess
import sys
import time
import urllib.request

codex, relay, key, work, db_path = sys.argv[1:6]
quota, balance = int(sys.argv[6]), int(sys.argv[7])

# One billed turn with the key.
req = urllib.request.Request(
    f"http://{relay}/v1/responses",
    data=json.dumps({"model": "gpt-test", "input": "what is my quota?", "store": False,
                     "max_output_tokens": 16}).encode(),
    headers={"authorization": f"Bearer {key}", "content-type": "application/json"},
)
assert urllib.request.urlopen(req, timeout=20).status == 200
db = sqlite3.connect(db_path)
prefix = key[:12]
deadline = time.time() + 10
while True:
    (spent,) = db.execute("select spent_nanousd from api_keys where key_prefix = ?", (prefix,)).fetchone()
    if spent > 0 or time.time() > deadline:
        break
    time.sleep(0.1)
assert spent > 0, "the turn was billed"

home = os.path.join(work, "codexstatus")
os.makedirs(home, exist_ok=True)


def b64(d):
    return base64.urlsafe_b64encode(json.dumps(d).encode()).rstrip(b"=").decode()


now = int(time.time())
claims = {
    "email": "status@example.com",
    "iat": now,
    "exp": now + 86400,
    "https://api.openai.com/auth": {"chatgpt_plan_type": "pro", "chatgpt_account_id": "acct_status",
                                    "chatgpt_user_id": "user_status"},
}
auth = {
    "OPENAI_API_KEY": None,
    "tokens": {"id_token": b64({"alg": "none"}) + "." + b64(claims) + ".x", "access_token": key,
               "refresh_token": "unused", "account_id": "acct_status"},
    "last_refresh": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
}
with open(os.path.join(home, "auth.json"), "w") as f:
    json.dump(auth, f)
with open(os.path.join(home, "config.toml"), "w") as f:
    f.write(f'chatgpt_base_url = "http://{relay}/backend-api/"\ncli_auth_credentials_store = "file"\n')

app = subprocess.Popen([codex, "app-server"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                       stderr=subprocess.DEVNULL, env={**os.environ, "CODEX_HOME": home, "HOME": work},
                       text=True)


def send(msg):
    app.stdin.write(json.dumps(msg) + "\n")
    app.stdin.flush()


def answer(want, limit=60):
    end = time.time() + limit
    while time.time() < end:
        line = app.stdout.readline()
        if not line:
            break
        msg = json.loads(line)
        if msg.get("id") == want:
            return msg
    raise AssertionError(f"no answer to request {want}")


try:
    send({"id": 0, "method": "initialize", "params": {"clientInfo": {"name": "turnpike-ci", "version": "1"}}})
    answer(0)
    send({"method": "initialized", "params": {}})
    send({"id": 1, "method": "account/rateLimits/read"})
    got = answer(1)
finally:
    app.kill()
assert "result" in got, got
limits = got["result"]["rateLimits"]
used = math.ceil(spent * 100 / quota)
assert limits["primary"]["usedPercent"] == used, (used, limits)
left = balance - spent
assert limits["credits"]["unlimited"] is False and limits["credits"]["hasCredits"] is True, limits
assert decimal.Decimal(limits["credits"]["balance"]) * 10**9 == left, (left, limits)
print(f"Codex reads {limits['primary']['usedPercent']} % of the key's quota used and "
      f"{limits['credits']['balance']} USD of balance, as billed")
