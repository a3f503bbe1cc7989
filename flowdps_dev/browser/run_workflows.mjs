// Drive the real ComfyUI web frontend in Debian's headless chromium (playwright-core, no downloaded browser).
//
//   node run_workflows.mjs --url http://127.0.0.1:PORT [--chromium /usr/bin/chromium] [--width 1400 --height 900]
//
// The script opens the app once and then answers one JSON command per stdin line with one JSON line on stdout
// (all diagnostics go to stderr). flowdps_dev/frontend.py is the Python side; it decides what to substitute
// between `load` and `queue`, so the prompt that runs is the frontend's own graph-to-prompt conversion.
//
//   {"cmd": "load", "name": "x.json", "workflow": {...}}  or  {"cmd": "load", "name": .., "template": {module, name}}
//       app.loadGraphData(workflow) -> {missing_types, dialogs, errors, prompt (app.graphToPrompt().output), ...};
//       with `template` the workflow is fetched from the server's template route, as the template browser does
//   {"cmd": "templates"}  -> the template browser's list of custom-node workflows
//   {"cmd": "queue", "prompt": {...}, "screenshot": "out/x.png", "timeout_s": 300}
//       api.queuePrompt(prompt, with the loaded UI workflow) -> waits for /history -> screenshot
//   {"cmd": "screenshot", "path": "x.png"}      {"cmd": "quit"}
//
// playwright-core comes from the set-up's npm ci (FLOWDPS_NODE_MODULES, default <repo>/.cache/browser/node_modules).
import { createRequire } from 'node:module';
import fs from 'node:fs';
import path from 'node:path';
import readline from 'node:readline';
import { fileURLToPath } from 'node:url';

const here = path.dirname(fileURLToPath(import.meta.url));
const modules = process.env.FLOWDPS_NODE_MODULES || path.resolve(here, '../../.cache/browser/node_modules');
const { chromium } = createRequire(path.join(modules, 'noop.cjs'))('playwright-core');

function option(name, fallback) {
  const i = process.argv.indexOf(`--${name}`);
  return i > 0 && i + 1 < process.argv.length ? process.argv[i + 1] : fallback;
}
const url = option('url', 'http://127.0.0.1:8188');
const executablePath = option('chromium', process.env.FLOWDPS_CHROMIUM || '/usr/bin/chromium');
const viewport = { width: Number(option('width', 1400)), height: Number(option('height', 900)) };
const origin = new URL(url).origin;
const log = (...a) => console.error('[run_workflows]', ...a);
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

// Known noise of ComfyUI 0.3.75 / frontend 1.32.9 on a machine with no internet and a fresh user folder. It is
// reported as `ignored`, never as an error; anything else the page logs as an error fails the test.
// * optional per-user files that a fresh user folder does not have (404):
const OPTIONAL_FILES = [/\/user\.css$/, /\/api\/userdata\/user\.css$/, /\/api\/userdata\?dir=(workflows|subgraphs)\b/,
                        /\/api\/userdata\/comfy\.templates\.json$/];
const NOISE = [
  // the browser's own line for a failed request; the `response` / `requestfailed` events report (and judge) it
  /^Failed to load resource: /,
  // the Comfy registry and model hosts, refused by ComfyUI's Content-Security-Policy (connect-src 'self'):
  // the frontend looks up pack info, and the missing-models dialog asks huggingface for the file size
  /^(Connecting to '|Fetch API cannot load )https?:\/\/(?!127\.0\.0\.1[:/])[^ ']+'?[. ].*Content Security Policy/,
  /^Error fetching file size: TypeError: Failed to fetch\n\s+at fetchFileSize /,
  // the editor sets a render-mode setting that has no definition when GraphView mounts (frontend bug, no effect)
  /^TypeError: Cannot read properties of undefined \(reading 'id'\)\n\s+at onChange .*\n\s+at Proxy\.set .*\n.*\n\s+at load \(.*\/GraphView-/,
];

// ------------------------------------------------------------------------------------------- the browser
const t0 = Date.now();
const browser = await chromium.launch({
  executablePath,
  headless: true,
  args: ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run', '--disable-background-networking',
         '--disable-component-update', '--disable-sync', '--disable-extensions', '--hide-scrollbars'],
});
const context = await browser.newContext({ viewport, deviceScaleFactor: 1 });
// "Introducing Nodes 2.0" banner: a localStorage flag, not a server-side setting
await context.addInitScript(() => { try { localStorage.setItem('vueNodesBannerDismissed', 'true'); } catch (e) { /* */ } });
// Only the test server is ever contacted: everything else (Comfy cloud endpoints, fonts) is aborted.
await context.route((u) => u.origin !== origin, (route) => {
  record('ignored', `blocked: ${route.request().url()}`);
  return route.abort('blockedbyclient');
});
const page = await context.newPage();

let events = [];  // {kind: 'error' | 'ignored' | 'warning', text}
function record(kind, text) {
  text = String(text).split('\n').slice(0, 6).join('\n');
  if (kind === 'error' && NOISE.some((re) => re.test(text))) kind = 'ignored';
  events.push({ kind, text });
}
const optional = (u) => OPTIONAL_FILES.some((re) => re.test(u));
page.on('console', (m) => {
  if (m.type() === 'error') record('error', m.text());
  else if (m.type() === 'warning') record('warning', m.text());
});
page.on('pageerror', (e) => record('error', `uncaught: ${e.stack || e.message}`));
page.on('response', (r) => {
  if (r.status() >= 400) record(optional(r.url()) ? 'ignored' : 'error', `HTTP ${r.status()} ${r.url()}`);
});
page.on('requestfailed', (r) => {
  const u = r.url();
  if (new URL(u).origin !== origin) return;  // recorded as blocked by the route
  record(optional(u) ? 'ignored' : 'error', `request failed (${r.failure()?.errorText}): ${u}`);
});
function takeEvents() {
  const out = { errors: [], ignored: [], warnings: [] };
  for (const e of events) out[e.kind === 'error' ? 'errors' : e.kind === 'ignored' ? 'ignored' : 'warnings'].push(e.text);
  events = [];
  return out;
}

await page.goto(url, { waitUntil: 'domcontentloaded' });
await page.waitForFunction(() => window.app?.graph && window.app?.canvas && window.app?.api &&
  Object.keys(window.LiteGraph?.registered_node_types || {}).length > 100, null, { timeout: 120000 });
await page.waitForTimeout(500);
await closeDialogs();
const startup = await page.evaluate(() => ({
  frontend_version: window.__COMFYUI_FRONTEND_VERSION__ || null,
  node_types: Object.keys(window.LiteGraph.registered_node_types).length,
  registered_types: Object.keys(window.LiteGraph.registered_node_types),
}));
reply({ event: 'ready', seconds: (Date.now() - t0) / 1000, ...startup, ...takeEvents() });

// ---------------------------------------------------------------------------------------------- helpers
async function visibleDialogs() {
  return page.evaluate(() => [...document.querySelectorAll('.p-dialog')]
    .filter((d) => d.offsetParent !== null || d.getClientRects().length > 0)
    .map((d) => d.innerText.replace(/\s+/g, ' ').trim().slice(0, 600)));
}

async function closeDialogs() {
  for (let i = 0; i < 5 && (await visibleDialogs()).length; i++) {
    await page.keyboard.press('Escape');
    await page.waitForTimeout(200);
  }
}

async function settle() {
  // two animation frames: the canvas has drawn what the last call changed
  await page.evaluate(() => new Promise((r) => requestAnimationFrame(() => requestAnimationFrame(r))));
}

let loaded = null;  // {name, workflow} as the frontend serialises it (app.graphToPrompt().workflow)

async function load({ name, workflow, template }) {
  const t = Date.now();
  takeEvents();
  await closeDialogs();
  let fetched = null;
  if (template) {
    // as the template browser does: fetch <api>/workflow_templates/<pack folder>/<name>.json, then load it
    fetched = await page.evaluate(async ([mod, n]) => {
      const r = await fetch(window.app.api.apiURL(`/workflow_templates/${mod}/${n}.json`));
      return r.ok ? r.json() : { http_status: r.status };
    }, [template.module, template.name]);
    if (fetched.http_status) throw new Error(`template ${template.module}/${template.name}: HTTP ${fetched.http_status}`);
    workflow = fetched;
  }
  await page.evaluate(async ([wf, n, tpl]) => {
    await window.app.loadGraphData(wf, true, true, n, tpl ? { openSource: 'template' } : {});
  }, [workflow, name, Boolean(template)]);
  // the missing-nodes / missing-models dialogs open asynchronously after the load (the latter after a look at
  // the model folders): wait for one where the graph can raise one, at most 5 s, and always 0.7 s
  const mayWarn = await page.evaluate(() => window.app.graph.nodes.some((n) =>
    !(n.type in window.LiteGraph.registered_node_types) || n.has_errors || n.properties?.models?.length));
  const deadline = Date.now() + (mayWarn ? 5000 : 700);
  await page.waitForTimeout(700);
  while (!(await visibleDialogs()).length && Date.now() < deadline) await page.waitForTimeout(100);
  await settle();
  const dialogs = await visibleDialogs();
  const graph = await page.evaluate(() => {
    const registered = window.LiteGraph.registered_node_types;
    const nodes = window.app.graph.nodes;
    return {
      node_count: nodes.length,
      missing_types: [...new Set(nodes.filter((n) => !(n.type in registered) || n.has_errors).map((n) => n.type))],
      widget_values: Object.fromEntries(nodes.map((n) => [n.id, (n.widgets || []).map((w) => w.value)])),
    };
  });
  await closeDialogs();
  await page.evaluate(() => window.app.extensionManager.command.execute('Comfy.Canvas.FitView'));
  await settle();
  const { output, workflow: serialised } = await page.evaluate(() => window.app.graphToPrompt());
  loaded = { name, workflow: serialised };
  return { seconds: (Date.now() - t) / 1000, dialogs, ...graph, prompt: output, template_workflow: fetched,
           ...takeEvents() };
}

async function queue({ prompt, screenshot, timeout_s = 300 }) {
  if (!loaded) throw new Error('queue before load');
  const t = Date.now();
  // the frontend's own client call (what the Run button does after graphToPrompt), with the UI workflow
  // attached as extra_pnginfo; a 400 (node errors) comes back as a thrown PromptExecutionError
  const queued = await page.evaluate(async ([output, workflow]) => {
    try {
      return { ok: true, ...(await window.app.api.queuePrompt(0, { output, workflow })) };
    } catch (e) {
      return { ok: false, error: e?.response ?? String(e) };
    }
  }, [prompt, loaded.workflow]);
  if (!queued.ok) return { queued: false, error: queued.error, seconds: (Date.now() - t) / 1000, ...takeEvents() };
  const id = queued.prompt_id;
  let entry = null;
  while (Date.now() - t < timeout_s * 1000) {
    entry = await page.evaluate(async (pid) => {
      const r = await window.app.api.fetchApi(`/history/${pid}`);
      return (await r.json())[pid] ?? null;
    }, id);
    if (entry && (entry.status?.completed || ['success', 'error'].includes(entry.status?.status_str))) break;
    entry = null;
    await sleep(250);
  }
  const seconds = (Date.now() - t) / 1000;
  if (!entry) return { queued: true, prompt_id: id, node_errors: queued.node_errors, finished: false, seconds, ...takeEvents() };
  // the editor shows each SaveImage / PreviewImage result on its node once the `executed` message arrived
  const shown = await page.waitForFunction((outputs) => {
    const nodes = window.app.graph.nodes.filter((n) => outputs.includes(String(n.id)));
    return nodes.every((n) => n.imgs?.length > 0) ? nodes.map((n) => String(n.id)) : false;
  }, Object.keys(entry.outputs || {}).filter((k) => entry.outputs[k].images?.length), { timeout: 30000 })
    .then((h) => h.jsonValue()).catch(() => null);
  await settle();
  if (screenshot) {
    fs.mkdirSync(path.dirname(screenshot), { recursive: true });
    await page.screenshot({ path: screenshot });
  }
  return { queued: true, prompt_id: id, node_errors: queued.node_errors, finished: true,
           status: entry.status?.status_str ?? null, seconds, images_shown_on: shown, ...takeEvents() };
}

async function templates() {
  // the template browser's list of custom-node templates: {pack folder: [workflow names]}
  return { templates: await page.evaluate(() => window.app.api.getWorkflowTemplates()) };
}

async function shot({ path: file, fit = true }) {
  await closeDialogs();
  if (fit) await page.evaluate(() => window.app.extensionManager.command.execute('Comfy.Canvas.FitView'));
  await settle();
  fs.mkdirSync(path.dirname(file), { recursive: true });
  await page.screenshot({ path: file });
  return { path: file };
}

function reply(obj) {
  process.stdout.write(JSON.stringify(obj) + '\n');
}

// ------------------------------------------------------------------------------------------- command loop
const handlers = { load, queue, templates, screenshot: shot };
const lines = readline.createInterface({ input: process.stdin });
for await (const line of lines) {
  if (!line.trim()) continue;
  let msg;
  try {
    msg = JSON.parse(line);
  } catch (e) {
    reply({ ok: false, exception: `bad JSON: ${e.message}` });
    continue;
  }
  if (msg.cmd === 'quit') break;
  try {
    if (!handlers[msg.cmd]) throw new Error(`unknown command ${msg.cmd}`);
    reply({ ok: true, ...(await handlers[msg.cmd](msg)) });
  } catch (e) {
    log(e?.stack || e);
    reply({ ok: false, exception: String(e?.message || e), ...takeEvents() });
  }
}
await browser.close();
log(`closed after ${(Date.now() - t0) / 1000} s`);
