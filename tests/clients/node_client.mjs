// openai-node `ResponsesWS` against a Responses WebSocket endpoint (turnpike): two chained text
// turns, then a tool-call loop on the same socket. Each completed response is appended to
// $REPORT as a JSON line (client, response id, usage) for the usage check. Exits non-zero on
// any failure.
import { appendFileSync } from 'node:fs';
import { execSync } from 'node:child_process';
import OpenAI from 'openai';
import { ResponsesWS } from 'openai/resources/responses/ws';

const [baseURL] = process.argv.slice(2);
const client = new OpenAI({ apiKey: process.env.CLIENT_KEY, baseURL });
const ws = new ResponsesWS(client);
const TOOLS = [{
  type: 'function', name: 'exec_command', description: 'Run a shell command',
  parameters: { type: 'object', properties: { cmd: { type: 'string' } }, required: ['cmd'] },
}];

function turn(params) {
  return new Promise((resolve, reject) => {
    let text = '';
    const handlers = {
      'response.output_text.delta': (e) => { text += e.delta; },
      'response.completed': (e) => { off(); resolve({ response: e.response, text }); },
      'error': (e) => { off(); reject(new Error(`turn failed: ${JSON.stringify(e)}`)); },
      'response.failed': (e) => { off(); reject(new Error(`turn failed: ${JSON.stringify(e)}`)); },
    };
    const off = () => { for (const [k, h] of Object.entries(handlers)) ws.off(k, h); };
    for (const [k, h] of Object.entries(handlers)) ws.on(k, h);
    ws.send({ type: 'response.create', model: 'gpt-test', store: false, ...params });
  });
}

function report(response) {
  if (process.env.REPORT) {
    appendFileSync(process.env.REPORT, JSON.stringify({
      client: 'node', response_id: response.id,
      input_tokens: response.usage.input_tokens, output_tokens: response.usage.output_tokens,
    }) + '\n');
  }
}

const timer = setTimeout(() => { console.error('node client: timed out'); process.exit(1); }, 60000);
try {
  let { response, text } = await turn({ input: 'Say hello' });
  report(response);
  console.log(`node text turn: id=${response.id} text=${JSON.stringify(text)}`);
  ({ response, text } = await turn({ input: 'And again', previous_response_id: response.id }));
  report(response);
  console.log(`node chained turn: id=${response.id}`);
  ({ response } = await turn({ input: 'run the tool [[sim: tool]]', previous_response_id: response.id, tools: TOOLS }));
  report(response);
  const call = response.output.find((i) => i.type === 'function_call');
  const output = execSync(JSON.parse(call.arguments).cmd).toString();
  console.log(`node tool call: ${call.name} -> ${JSON.stringify(output.trim())}`);
  ({ response, text } = await turn({
    previous_response_id: response.id, tools: TOOLS,
    input: [{ type: 'function_call_output', call_id: call.call_id, output }],
  }));
  report(response);
  console.log(`node tool loop done: id=${response.id} text=${JSON.stringify(text)}`);
  clearTimeout(timer);
  ws.close({ code: 1000, reason: 'done' });
} catch (e) {
  console.error(e);
  process.exit(1);
}
