"""openai-python `client.responses.connect()` against a Responses WebSocket endpoint (the sim, or
turnpike): a text turn, then a tool-call loop on the same socket, chained. Each completed response
is appended to $REPORT (when set) as a JSON line for the usage check. Exits non-zero on any
failure."""
import json
import os
import subprocess
import sys

from openai import OpenAI

TOOLS = [{
    "type": "function",
    "name": "exec_command",
    "description": "Run a shell command",
    "parameters": {"type": "object", "properties": {"cmd": {"type": "string"}}, "required": ["cmd"]},
}]


def report(resp):
    path = os.environ.get("REPORT")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps({"client": "python", "response_id": resp.id,
                                "input_tokens": resp.usage.input_tokens,
                                "output_tokens": resp.usage.output_tokens}) + "\n")


def run_turn(conn, **params):
    conn.response.create(model="gpt-test", store=False, **params)
    text = ""
    seq = -1
    for ev in conn:
        # Deltas arrive in order.
        number = getattr(ev, "sequence_number", None)
        if number is not None:
            if number <= seq:
                sys.exit(f"events out of order: {number} after {seq}")
            seq = number
        if ev.type == "response.output_text.delta":
            text += ev.delta
        elif ev.type == "response.completed":
            report(ev.response)
            return ev.response, text
        elif ev.type in ("error", "response.failed", "response.incomplete"):
            sys.exit(f"turn failed: {ev}")
    sys.exit("socket ended before a terminal event")


def main():
    base_url, key = sys.argv[1], os.environ.get("SIM_KEY", "sk-sim-clients")
    client = OpenAI(api_key=key, base_url=base_url)
    with client.responses.connect() as conn:
        resp, text = run_turn(conn, input="Say hello")
        print(f"python text turn: id={resp.id} text={text!r} "
              f"usage=in:{resp.usage.input_tokens}/out:{resp.usage.output_tokens}")

        resp, _ = run_turn(conn, input="run the tool [[sim: tool]]", previous_response_id=resp.id, tools=TOOLS)
        call = next(item for item in resp.output if item.type == "function_call")
        cmd = json.loads(call.arguments)["cmd"]
        output = subprocess.run(cmd, shell=True, capture_output=True, text=True).stdout
        print(f"python tool call: {call.name}({cmd!r}) -> {output.strip()!r}")

        resp, text = run_turn(conn, previous_response_id=resp.id, tools=TOOLS, input=[
            {"type": "function_call_output", "call_id": call.call_id, "output": output}])
        print(f"python tool loop done: id={resp.id} text={text!r}")


if __name__ == "__main__":
    main()
