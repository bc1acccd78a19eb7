"""openai-python over turnpike's HTTP surface: `responses.create` (JSON), `responses.create(stream=True)`
(SSE: the deltas arrive before the terminal, which carries the usage) and `responses.compact`.
Each response is appended to $REPORT as a JSON line for the usage check. Exits non-zero on any
failure."""
import json
import os
import sys

from openai import OpenAI


def report(kind, resp_id, usage):
    with open(os.environ["REPORT"], "a") as f:
        f.write(json.dumps({"client": f"python-http-{kind}", "response_id": resp_id,
                            "input_tokens": usage.input_tokens,
                            "output_tokens": usage.output_tokens}) + "\n")


client = OpenAI(api_key=os.environ["CLIENT_KEY"], base_url=sys.argv[1])

# JSON.
resp = client.responses.create(model="gpt-test", store=False, input="Say hello over HTTP")
assert resp.status == "completed", resp
assert resp.output_text, resp
report("json", resp.id, resp.usage)

# SSE.
deltas, done = [], None
with client.responses.create(model="gpt-test", store=False, input="Stream it [[sim: deltas=4]]",
                             stream=True) as stream:
    for ev in stream:
        if ev.type == "response.output_text.delta":
            if done is not None:
                sys.exit("a delta after the terminal")
            deltas.append(ev.delta)
        elif ev.type == "response.completed":
            done = ev.response
        elif ev.type in ("error", "response.failed"):
            sys.exit(f"stream failed: {ev}")
assert done is not None and len(deltas) == 4, (done, deltas)
assert "".join(deltas) == done.output_text, (deltas, done.output_text)
report("sse", done.id, done.usage)

# Compaction.
compacted = client.responses.compact(model="gpt-test",
                                     input=[{"role": "user", "content": "a long conversation to shrink"}])
assert compacted.object == "response.compaction", compacted
assert compacted.output and compacted.output[0].type == "compaction", compacted
report("compact", compacted.id, compacted.usage)

# A refusal in the JSON error shape reaches the SDK as its typed error.
try:
    client.responses.create(model="gpt-test", input="x", previous_response_id="msg_not_a_response")
    sys.exit("an item id as previous_response_id was not refused")
except Exception as e:  # openai.BadRequestError
    assert getattr(e, "status_code", None) == 400, e
    assert getattr(e, "code", None) == "invalid_previous_response_id", (e, getattr(e, "body", None))
print("json, sse, compact and a refusal over HTTP: ok")
