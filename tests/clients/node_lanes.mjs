// openai-node 7 (Node ≥ 22) over turnpike, the WebSocket guide's lanes flow: two lanes created
// back to back on one socket (`stream_id` alpha and beta), both consumed with the SDK's lane
// helper, then a fork of alpha's response onto a third lane. Each completed response is
// appended to $REPORT for the usage check. Exits non-zero on any failure.
import { appendFileSync } from 'node:fs';
import OpenAI from 'openai';
import { ResponsesWS } from 'openai/resources/responses/ws';
import { ResponsesWebSocketSession } from 'openai/lib/responses/responses-websocket-session';

const [baseURL] = process.argv.slice(2);
const client = new OpenAI({ apiKey: process.env.CLIENT_KEY, baseURL });
const ws = new ResponsesWS(client);
const timer = setTimeout(() => { console.error('node lanes: timed out'); process.exit(1); }, 60000);

function report(response) {
  if (response.status !== 'completed') throw new Error(`not completed: ${JSON.stringify(response)}`);
  if (process.env.REPORT) {
    appendFileSync(process.env.REPORT, JSON.stringify({
      client: 'node-lanes', response_id: response.id,
      input_tokens: response.usage.input_tokens, output_tokens: response.usage.output_tokens,
    }) + '\n');
  }
}

try {
  // The lane helper attaches to an open socket.
  if (ws.socket.readyState !== 1) {
    await new Promise((resolve, reject) => { ws.socket.once('open', resolve); ws.socket.once('error', reject); });
  }
  const session = new ResponsesWebSocketSession(ws, { maxLanes: 8, maxBufferedEvents: 10000, maxBufferedBytes: 1 << 24 });
  const alpha = session.lane('alpha');
  const beta = session.lane('beta');
  alpha.create({ model: 'gpt-test', store: false, input: 'Lane alpha says hello' });
  beta.create({ model: 'gpt-test', store: false, input: 'Lane beta says hello' });
  const [a, b] = await Promise.all([alpha.finalResponse(), beta.finalResponse()]);
  report(a);
  report(b);
  if (!a.output_text || !b.output_text) throw new Error('a lane without text');
  const fork = session.lane('fork');
  fork.create({ model: 'gpt-test', store: false, previous_response_id: a.id, input: 'Fork alpha' });
  const f = await fork.finalResponse();
  report(f);
  console.log(`node lanes: alpha=${a.id} beta=${b.id} fork=${f.id}`);
  session.close();
  ws.close();
  clearTimeout(timer);
} catch (e) {
  console.error(e);
  process.exit(1);
}
