// openai-node (the newest pinned) `ResponsesWS` steering that races its response's end, through
// turnpike: a steer for a completed response, then one sent as the first delta of a short
// response arrives. Each is answered by the protocol (`response.steer.accepted` then the
// successor, or `response.steer.failed` with the input handed back), never a bare `error` — which
// this SDK turns into an unhandled rejection; the socket then serves a normal turn. Exits
// non-zero on any failure.
import OpenAI from 'openai';
import { ResponsesWS } from 'openai/resources/responses/ws';

const [baseURL, apiKey] = process.argv.slice(2);
const client = new OpenAI({ apiKey, baseURL });
const ws = new ResponsesWS(client);
const fail = (why) => { console.error(`node steer race: ${why}`); process.exit(1); };
ws.on('error', (e) => fail(`a bare error: ${JSON.stringify(e)}`));
setTimeout(() => fail('timed out'), 60000).unref();

// Events until `done(event)` says the wait is over.
function until(done) {
  return new Promise((resolve) => {
    const seen = (e) => { if (done(e)) { ws.off('event', seen); resolve(e); } };
    ws.on('event', seen);
  });
}

async function completed(input) {
  const end = until((e) => ['response.completed', 'response.failed', 'response.incomplete'].includes(e.type));
  ws.send({ type: 'response.create', model: 'gpt-test', store: false, input });
  const e = await end;
  if (e.type !== 'response.completed') fail(`turn failed: ${JSON.stringify(e)}`);
  return e.response;
}

// 1. Too late: the response has completed.
const done = await completed('Say hello [[sim: deltas=1]]');
const refused = until((e) => e.type.startsWith('response.steer'));
ws.send({ type: 'response.steer', previous_response_id: done.id, input: 'Too late.' });
const late = await refused;
if (late.type !== 'response.steer.failed' || late.steer?.input !== 'Too late.') {
  fail(`a late steer answered ${JSON.stringify(late)}`);
}
console.log(`node: late steer refused (${late.error?.code}), input handed back`);

// 2. The race: steer as the first delta arrives; the response may end first.
let steered = null; let answer = null; let ended = false; let successor = null;
const settled = until((e) => {
  if (e.type === 'response.created' && steered === null) steered = e.response.id;
  else if (e.type === 'response.created') successor = e.response.id;
  else if (e.type === 'response.output_text.delta' && answer === null && successor === null) {
    ws.send({ type: 'response.steer', previous_response_id: steered, input: 'Shorter.' });
    answer = 'sent';
  } else if (e.type === 'response.steer.accepted' || e.type === 'response.steer.failed') answer = e.type;
  else if (e.type === 'response.completed' || e.type === 'response.incomplete') {
    if (e.response.id === steered) ended = true;
    else if (e.response.id === successor) successor = 'done';
  } else if (e.type === 'response.failed') fail(`response failed: ${JSON.stringify(e)}`);
  return ended && (answer === 'response.steer.failed' || (answer === 'response.steer.accepted' && successor === 'done'));
});
ws.send({ type: 'response.create', model: 'gpt-test', store: false, input: 'A short answer [[sim: deltas=2 delta_delay_ms=2]]' });
await settled;
console.log(`node: racing steer answered ${answer}; successor: ${successor}`);

// 3. The socket goes on.
const after = await completed('And now?');
console.log(`node: next turn completed: ${after.id}`);
ws.close({ code: 1000, reason: 'done' });
