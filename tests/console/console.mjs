// The operators' console in headless Chromium (puppeteer-core driving the system browser): a wrong
// token shows the API's 401 message; with the right one a running session appears; Restart on
// `accounting` raises its restart count; End on the session sends the client `session_ended`;
// Retry on a dead compensation settles it; Keys shows the key's allow-lists; a user is created and
// topped up, a key created for it (shown once, it serves a turn) and revoked (then refused); the
// audit trail lists those changes under the operator's name. With SCREENSHOTS=DIR, one PNG per view lands there.
//
// node console.mjs ADMIN_ADDR RELAY_ADDR KEY TOKEN
import puppeteer from "puppeteer-core";
import WebSocket from "ws";

const [admin, relay, key, token] = process.argv.slice(2);
const shots = process.env.SCREENSHOTS;
const fail = (msg) => { console.error("FAIL " + msg); process.exit(1); };
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

// A client session that stays open, recording what it hears.
const heard = [];
const ws = new WebSocket(`ws://${relay}/v1/responses`, { headers: { authorization: `Bearer ${key}` } });
await new Promise((ok, err) => { ws.on("open", ok); ws.on("error", err); });
ws.on("message", (m) => heard.push(JSON.parse(m.toString())));
ws.send(JSON.stringify({ type: "response.create", model: "gpt-test", store: false, input: "hello console" }));
for (let i = 0; i < 100 && !heard.some((e) => e.type === "response.completed"); i++) await sleep(50);
if (!heard.some((e) => e.type === "response.completed")) fail("the client's turn did not complete");

// BROWSER=firefox: Debian's Firefox ESR over WebDriver BiDi; default: Debian's Chromium.
const firefox = process.env.BROWSER === "firefox";
const browser = await puppeteer.launch(firefox
  ? { browser: "firefox", executablePath: "/usr/bin/firefox-esr", headless: true }
  : { executablePath: "/usr/bin/chromium", headless: true, args: ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"] });
const page = await browser.newPage();
await page.setViewport({ width: 1280, height: 800 });
// The confirmations of Restart, End and Revoke; a prompt (Top up) gets `promptAnswer`.
let promptAnswer = "";
page.on("dialog", (d) => (d.type() === "prompt" ? d.accept(promptAnswer) : d.accept()));
const shot = async (name) => { if (shots && !firefox) await page.screenshot({ path: `${shots}/console-${name}.png`, fullPage: true }); };
const text = (sel) => page.$eval(sel, (e) => e.textContent);
const waitText = async (sel, pred, what) => {
  for (let i = 0; i < 100; i++) {
    const t = await page.$eval(sel, (e) => e.textContent).catch(() => null);
    if (t !== null && pred(t)) return t;
    await sleep(100);
  }
  fail(`${what} (${sel}: ${await page.$eval(sel, (e) => e.textContent).catch(() => "absent")})`);
};
const view = async (name) => { await page.click(`nav button[data-view="${name}"]`); await sleep(300); };

await page.goto(`http://${admin}/admin/console`);
// A wrong token: the API's own words.
await page.type("#token", "not-the-token");
await page.click("#connect");
await waitText("#error", (t) => t.includes("admin_unauthorized"), "the 401 message is shown");
if (!(await page.$eval("#login", (e) => !e.hidden))) fail("the login form stays after a 401");

// The right token, and a name for the audit trail.
const operator = firefox ? "ci-firefox" : "ci-chromium";
await page.$eval("#token", (e) => { e.value = ""; });
await page.type("#token", token);
await page.type("#operator", operator);
await page.click("#connect");
await waitText("#view .card .value", (t) => t === "yes", "overview says ready");
await shot("overview");

// The running session appears.
await view("sessions");
await page.waitForSelector("#view tr[data-session]", { timeout: 10000 });
const session = await page.$eval("#view tr[data-session]", (e) => e.dataset.session);
await shot("sessions");

// Restart accounting: its restart count rises.
await view("actors");
await page.waitForSelector('tr[data-actor="accounting"] .restarts');
const before = Number(await text('tr[data-actor="accounting"] .restarts'));
await page.click("#restart-accounting");
await waitText('tr[data-actor="accounting"] .restarts', (t) => Number(t) === before + 1, "accounting's restarts rose by one");
await shot("actors");

await view("accounts");
await page.waitForSelector("#view tr[data-account]");
await shot("accounts");

// End the session: the client hears session_ended.
await view("sessions");
await page.waitForSelector(`#end-${session}`);
await page.click(`#end-${session}`);
for (let i = 0; i < 100 && !heard.some((e) => e.error && e.error.code === "session_ended"); i++) await sleep(50);
if (!heard.some((e) => e.error && e.error.code === "session_ended")) fail("the client did not get session_ended: " + JSON.stringify(heard.slice(-3)));

// Retry a dead compensation: it settles.
await view("compensations");
await page.select("#comp-filter", "dead");
await page.waitForSelector("#view tr[data-compensation]");
const comp = await page.$eval("#view tr[data-compensation]", (e) => e.dataset.compensation);
if ((await text(`tr[data-compensation="${comp}"] .status`)) !== "dead") fail("the compensation is not dead to begin with");
await page.click(`#retry-${comp}`);
await page.select("#comp-filter", "");
await waitText(`tr[data-compensation="${comp}"] .status`, (t) => t === "settled", "the retried compensation settled");
await shot("compensations");

// Keys: the session's key with its allow-lists.
await view("keys");
await page.waitForSelector("#view tr[data-key]");
await waitText("#view tr[data-key] .models", (t) => t === "gpt-test", "the key's model allow-list is shown");
await shot("keys");

await view("turns");
await page.waitForSelector("#view tbody tr");
await shot("turns");

// Users: one created and topped up from the console.
const who = firefox ? "dora-ff" : "dora-cr";
await view("users");
await page.type("#new-user-name", who);
await page.type("#new-user-balance", "3");
await page.click("#create-user");
await waitText(`tr[data-user="${who}"] .balance`, (t) => t === "3.000000", "the new user with its balance");
promptAnswer = "1.5";
await page.click(`#topup-${who}`);
await waitText(`tr[data-user="${who}"] .balance`, (t) => t === "4.500000", "the top-up added to the balance");
await shot("users");

// Keys: one created for that user, shown once; it serves a turn; revoked, it is refused.
await view("keys");
await page.type("#new-key-user", who);
await page.type("#new-key-quota", "2");
await page.click("#create-key");
const newKey = await waitText("#new-key", (t) => t.startsWith("tpk_"), "the new key is shown once");
const turnWith = async (k) => {
  const c = new WebSocket(`ws://${relay}/v1/responses`, { headers: { authorization: `Bearer ${k}` } });
  const opened = await new Promise((ok) => { c.on("open", () => ok(true)); c.on("unexpected-response", (_, res) => ok(res.statusCode)); c.on("error", () => ok(0)); });
  if (opened !== true) return opened;
  const got = [];
  c.on("message", (m) => got.push(JSON.parse(m.toString())));
  c.send(JSON.stringify({ type: "response.create", model: "gpt-test", store: false, input: "new key" }));
  for (let i = 0; i < 100 && !got.some((e) => e.type === "response.completed"); i++) await sleep(50);
  c.close();
  return got.some((e) => e.type === "response.completed") ? "completed" : JSON.stringify(got.slice(-2));
};
const first = await turnWith(newKey);
if (first !== "completed") fail("the key made in the console did not serve a turn: " + first);
await shot("keys");
const keyId = await page.$$eval("#view tr[data-key-id]", (rows, u) => rows.find((r) => r.children[2].textContent === u)?.dataset.keyId, who);
if (!keyId) fail("the new key is not listed");
await page.click(`#revoke-${keyId}`);
await waitText(`tr[data-key-id="${keyId}"] .state`, (t) => t === "revoked", "the key shows revoked");
let after = null;
for (let i = 0; i < 50 && after !== 401; i++) { after = await turnWith(newKey); if (after !== 401) await sleep(100); }
if (after !== 401) fail("a revoked key still opens a session: " + after);

// Audit: those changes, under the operator's name.
await view("audit");
await page.waitForSelector("#view tr[data-audit]");
const trail = await page.$$eval("#view tr[data-audit]", (rows) => rows.map((r) => [r.querySelector(".actor").textContent, r.querySelector(".action").textContent]));
for (const action of ["users.create", "users.balance", "keys.create", "keys.revoke", "actors.restart", "sessions.end", "compensations.retry"]) {
  if (!trail.some(([a, act]) => a === operator && act === action)) fail(`no ${action} by ${operator} in the audit: ${JSON.stringify(trail)}`);
}
if ((await page.content()).includes(newKey)) fail("the key itself appears in the audit view");
await shot("audit");

await browser.close();
ws.close();
console.log((firefox ? "firefox" : "chromium") + ": wrong token refused, session seen and ended, accounting restarted, compensation retried and settled, user created and topped up, key created, used and revoked, all audited");
