"""openai-python `client.responses.connect()` against a Responses WebSocket endpoint (the sim, or
turnpike): a text turn, then a tool-call loop on the same socket, chained; then the WebSocket
guide's lanes: two lanes in parallel (`stream_id`), a fork of one onto a third lane, and a steered
response with the upstream's automatic successor. Each completed response is appended to $REPORT
(when set) as a JSON line for the usage check. Exits non-zero on any failure."""
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


def until_completed(conn, lanes, allow_incomplete=()):
    """Events of every lane until each lane in `lanes` completed one response (each event's
    `stream_id` must be one of them); returns the completed responses by lane."""
    done = {}
    for ev in conn:
        lane = getattr(ev, "stream_id", None)
        if lane not in lanes:
            sys.exit(f"an event of lane {lane!r}: {ev}")
        if ev.type == "response.completed":
            report(ev.response)
            done[lane] = ev.response
            if set(done) == set(lanes):
                return done
        elif ev.type == "response.incomplete" and lane in allow_incomplete:
            reason = ev.response.incomplete_details.reason
            if reason != "steered":
                sys.exit(f"incomplete for {reason!r}")
            print(f"python steered response ended: id={ev.response.id}")
        elif ev.type in ("error", "response.failed", "response.incomplete", "response.steer.failed"):
            sys.exit(f"lane {lane!r} failed: {ev}")
    sys.exit("socket ended before every lane completed")


def lanes(conn):
    conn.response.create(model="gpt-test", store=False, stream_id="a", input="First lane")
    conn.response.create(model="gpt-test", store=False, stream_id="b", input="Second lane")
    done = until_completed(conn, {"a", "b"})
    print(f"python two lanes: a={done['a'].id} b={done['b'].id}")
    conn.response.create(model="gpt-test", store=False, stream_id="fork",
                         previous_response_id=done["a"].id, input="Fork lane a")
    fork = until_completed(conn, {"fork"})["fork"]
    # Without lanes upstream the fork ran over HTTP, where a `store:false` response cannot be
    # named: turnpike replayed lane a's conversation instead, so the field is empty.
    if fork.previous_response_id != done["a"].id and not os.environ.get("NO_LANES"):
        sys.exit(f"the fork does not continue lane a: {fork}")
    print(f"python fork: {fork.id} continues {done['a'].id}")
    # Steering: the steered response ends `steered`, the upstream's successor completes. With
    # NO_LANES (an upstream that refuses `stream_id`, where turnpike runs named lanes over HTTP)
    # the steer runs on the default lane, the one that stays on the socket.
    steer_lane = None if os.environ.get("NO_LANES") else "steer"
    lane_arg = {} if steer_lane is None else {"stream_id": steer_lane}
    conn.response.create(model="gpt-test", store=False, **lane_arg,
                         input="A long answer [[sim: delta_delay_ms=100]]")
    for ev in conn:
        if ev.type == "response.created":
            steered = ev.response.id
            break
    conn.response.steer(previous_response_id=steered, input="Keep it short.")
    successor = until_completed(conn, {steer_lane}, allow_incomplete={steer_lane})[steer_lane]
    if successor.previous_response_id != steered:
        sys.exit(f"the successor does not continue the steered response: {successor}")
    print(f"python steering: successor {successor.id} of {steered}")


def main():
    base_url, key = sys.argv[1], os.environ.get("SIM_KEY", "sk-sim-clients")
    client = OpenAI(api_key=key, base_url=base_url)
    if os.environ.get("NO_LANES"):
        with client.responses.connect() as conn:
            lanes(conn)
        return
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

    with client.responses.connect() as conn:
        lanes(conn)


if __name__ == "__main__":
    main()
