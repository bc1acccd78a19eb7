"""openai-python (the newest pinned) steering that races its response's end, through turnpike: a
steer for a response that has completed, then one sent the moment the first delta of a short
response arrives. Each is answered by the protocol — `response.steer.accepted` (then the
upstream's successor) or `response.steer.failed` with the input handed back — never a bare
`error`; the socket then serves a normal turn. Exits non-zero on any failure."""
import sys

from openai import OpenAI


def fail(why):
    sys.exit(f"python steer race: {why}")


def completed(conn, **params):
    conn.response.create(model="gpt-test", store=False, **params)
    for ev in conn:
        if ev.type == "response.completed":
            return ev.response
        if ev.type in ("error", "response.failed", "response.incomplete"):
            fail(f"turn failed: {ev}")
    fail("socket ended before a terminal event")


def main():
    base_url, key = sys.argv[1], sys.argv[2]
    client = OpenAI(api_key=key, base_url=base_url)
    with client.responses.connect() as conn:
        # 1. Too late: the response has completed.
        done = completed(conn, input="Say hello [[sim: deltas=1]]")
        conn.response.steer(previous_response_id=done.id, input="Too late.")
        for ev in conn:
            if ev.type == "response.steer.failed":
                if ev.steer.input != "Too late.":
                    fail(f"the input was not handed back: {ev}")
                print(f"python: late steer refused ({ev.error.code}), input handed back")
                break
            fail(f"a late steer answered with {ev.type}: {ev}")
        # 2. The race: steer as the first delta arrives; the response may end first.
        conn.response.create(model="gpt-test", store=False,
                             input="A short answer [[sim: deltas=2 delta_delay_ms=2]]")
        steered, answered, ended, successor = None, None, False, None
        for ev in conn:
            if ev.type == "error":
                fail(f"a bare error: {ev}")
            if ev.type == "response.created" and steered is None:
                steered = ev.response.id
            elif ev.type == "response.created":
                successor = ev.response.id
            elif ev.type == "response.output_text.delta" and answered is None and successor is None:
                conn.response.steer(previous_response_id=steered, input="Shorter.")
                answered = "sent"
            elif ev.type in ("response.steer.accepted", "response.steer.failed"):
                answered = ev.type
            elif ev.type in ("response.completed", "response.incomplete"):
                if ev.response.id == steered:
                    ended = True
                elif ev.response.id == successor:
                    successor = "done"
            elif ev.type == "response.failed":
                fail(f"response failed: {ev}")
            if ended and answered == "response.steer.failed":
                break
            if ended and answered == "response.steer.accepted" and successor == "done":
                break
        print(f"python: racing steer answered {answered}; successor: {successor}")
        # 3. The socket goes on.
        after = completed(conn, input="And now?")
        print(f"python: next turn completed: {after.id}")


main()
