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
//       with `template` the workflow is fetched from the server's template route (what dragging the file does)
//   {"cmd": "open_template", "module": "comfyui-flowdps", "name": "1 - ..."}
//       clicks through the template browser as a user: the sidebar's Templates button, the pack in the dialog's
//       navigation, the card; reports every card of the pack (title, picture loaded) and then what `load` reports
//   {"cmd": "view", "required": [node ids]}  -> the editor's view: zoom, offset, level of detail, every node's box
//       as the editor draws it (title bar and badges included), which required nodes are covered or off screen,
//       the note's font sizes on screen
//   {"cmd": "screen", "width": 1366, "height": 768}   later commands act in a tab of this window size (opened
//       with the app the first time): a workflow opens there as in a window of that size
//   {"cmd": "search", "query": "upscale"}  -> the node search box's results for a query
//   {"cmd": "templates"}  -> the template browser's list of custom-node workflows
//   {"cmd": "queue", "prompt": {...}, "screenshot": "out/x.png", "timeout_s": 300}
//       api.queuePrompt(prompt, with the loaded UI workflow) -> waits for /history -> screenshot
//   {"cmd": "screenshot", "path": "x.png", "fit": false}      {"cmd": "quit"}
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
                        /\/api\/userdata\/comfy\.templates\.json$/,
                        // ComfyUI's own templates' media, which the template browser starts loading and drops when
                        // it closes (the pack's pictures are served under /api/workflow_templates/ and are judged)
                        /^https?:\/\/[^/]+\/templates\/[^/]+$/];
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
const context = await browser.newContext({ viewport, deviceScaleFactor: 1 });  // each tab sets its own size
// "Introducing Nodes 2.0" banner: a localStorage flag, not a server-side setting
await context.addInitScript(() => { try { localStorage.setItem('vueNodesBannerDismissed', 'true'); } catch (e) { /* */ } });
// Only the test server is ever contacted: everything else (Comfy cloud endpoints, fonts) is aborted.
await context.route((u) => u.origin !== origin, (route) => {
  record('ignored', `blocked: ${route.request().url()}`);
  return route.abort('blockedbyclient');
});
let events = [];  // {kind: 'error' | 'ignored' | 'warning', text}
function record(kind, text) {
  text = String(text).split('\n').slice(0, 6).join('\n');
  if (kind === 'error' && NOISE.some((re) => re.test(text))) kind = 'ignored';
  events.push({ kind, text });
}
const optional = (u) => OPTIONAL_FILES.some((re) => re.test(u));
function takeEvents() {
  const out = { errors: [], ignored: [], warnings: [] };
  for (const e of events) out[e.kind === 'error' ? 'errors' : e.kind === 'ignored' ? 'ignored' : 'warnings'].push(e.text);
  events = [];
  return out;
}

// One page (tab) per window size, each with the app open: a workflow is opened in a window of the size it is
// checked at (the editor keeps the view's centre, not its corner, when a window is resized).
const pages = {};
let page = null;
async function openPage(size) {
  const p = await context.newPage();
  await p.setViewportSize(size);
  p.on('console', (m) => {
    if (m.type() === 'error') record('error', m.text());
    else if (m.type() === 'warning') record('warning', m.text());
  });
  p.on('pageerror', (e) => record('error', `uncaught: ${e.stack || e.message}`));
  p.on('response', (r) => {
    if (r.status() >= 400) record(optional(r.url()) ? 'ignored' : 'error', `HTTP ${r.status()} ${r.url()}`);
  });
  p.on('requestfailed', (r) => {
    const u = r.url();
    if (new URL(u).origin !== origin) return;  // recorded as blocked by the route
    record(optional(u) ? 'ignored' : 'error', `request failed (${r.failure()?.errorText}): ${u}`);
  });
  await p.goto(url, { waitUntil: 'domcontentloaded' });
  await p.waitForFunction(() => window.app?.graph && window.app?.canvas && window.app?.api &&
    Object.keys(window.LiteGraph?.registered_node_types || {}).length > 100, null, { timeout: 120000 });
  await p.waitForTimeout(500);
  pages[`${size.width}x${size.height}`] = p;
  return p;
}
page = await openPage(viewport);
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
  return { ...(await afterLoad(name)), seconds: (Date.now() - t) / 1000, template_workflow: fetched };
}

async function afterLoad(name) {
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
  await settle();  // the view stays as the workflow stored it (extra.ds), as a user sees it
  const { output, workflow: serialised } = await page.evaluate(() => window.app.graphToPrompt());
  loaded = { name, workflow: serialised };
  return { dialogs, ...graph, prompt: output, ...takeEvents() };
}

// ------------------------------------------------------------------------------------ the template browser
async function openTemplate({ module, name }) {
  const t = Date.now();
  takeEvents();
  await closeDialogs();
  // the sidebar's Templates button, as a user clicks it (the command is only a fallback, reported)
  let opened_by = 'sidebar button';
  const button = page.locator('.side-tool-bar-container').getByText('Templates', { exact: true });
  if (await button.count()) await button.first().click();
  else {
    opened_by = 'command Comfy.BrowseTemplates';
    await page.evaluate(() => window.app.extensionManager.command.execute('Comfy.BrowseTemplates'));
  }
  const dialog = page.locator('.workflow-template-selector-dialog');
  await dialog.waitFor({ timeout: 30000 });
  await dialog.getByText(module, { exact: true }).first().click();
  const card = dialog.locator(`[data-testid="template-workflow-${name}"]`);
  await card.waitFor({ timeout: 30000 });
  // every card of the pack: its title and whether its picture loaded (scrolled into view: pictures load lazily)
  const testids = await dialog.locator('[data-testid^="template-workflow-"]').evaluateAll(
    (els) => els.map((e) => e.getAttribute('data-testid')));
  const cards = [];
  for (const id of testids) {
    const c = dialog.locator(`[data-testid="${id}"]`);
    await c.scrollIntoViewIfNeeded();
    const img = c.locator('img').first();
    // the card renders its <img> only once it has been scrolled into view (lazily, later on a loaded machine)
    await img.waitFor({ state: 'attached', timeout: 15000 }).catch(() => {});
    const picture = (await img.count()) ? await img.evaluate(async (el) => {
      for (let i = 0; i < 100 && !el.complete; i++) await new Promise((r) => setTimeout(r, 50));
      return { src: el.currentSrc || el.src, loaded: el.complete && el.naturalWidth > 0, width: el.naturalWidth };
    }) : null;
    cards.push({ name: id.replace('template-workflow-', ''), text: (await c.innerText()).split('\n').filter(Boolean),
                 picture });
  }
  const template_workflow = await page.evaluate(async ([mod, n]) => {
    const r = await fetch(window.app.api.apiURL(`/workflow_templates/${mod}/${n}.json`));
    return r.ok ? r.json() : null;
  }, [module, name]);
  const noteText = (template_workflow?.nodes || []).find((n) => n.type === 'MarkdownNote')?.widgets_values?.[0];
  await card.scrollIntoViewIfNeeded();
  await card.click();
  // loaded: the editor shows this template's note (the previous workflow had a note too, but another text)
  await page.waitForFunction((text) => window.app.graph.nodes.some(
    (n) => n.type === 'MarkdownNote' && (text === undefined || n.widgets?.[0]?.value === text)), noteText,
  { timeout: 30000 });
  let dialog_closed = true;
  try { await dialog.waitFor({ state: 'hidden', timeout: 10000 }); } catch { dialog_closed = false; }
  const result = await afterLoad(name);
  return { ...result, seconds: (Date.now() - t) / 1000, opened_by, cards, dialog_closed, template_workflow };
}

// ------------------------------------------------------------------------------------------- the view
async function view({ required = [] }) {
  await settle();
  return page.evaluate((required) => {
    const app = window.app;
    const c = app.canvas;
    const [ox, oy] = c.ds.offset;
    const scale = c.ds.scale;
    const ctx = c.canvas.getContext('2d');
    const titleHeight = window.LiteGraph.NODE_TITLE_HEIGHT;
    const toScreen = ([x0, y0, x1, y1]) => {
      const r = c.canvas.getBoundingClientRect();
      return [r.left + (x0 + ox) * scale, r.top + (y0 + oy) * scale, r.left + (x1 + ox) * scale, r.top + (y1 + oy) * scale];
    };
    const nodes = app.graph.nodes.map((n) => {
      const [bx, by, bw, bh] = n.boundingRect;  // the editor's own bounds: the title bar included
      let box = [bx, by, bx + bw, by + bh];
      const badges = (n.badges || []).map((b) => (typeof b === 'function' ? b() : b)).filter((b) => b?.visible);
      if (badges.length && !c.low_quality) {  // drawn above the title bar, right-aligned (LGraphNode.drawBadges)
        const gap = 2;
        const width = badges.reduce((s, b) => s + b.getWidth(ctx) + gap, 0);
        const height = Math.max(...badges.map((b) => b.height));
        const top = n.pos[1] - titleHeight - gap - height;
        box = [Math.min(box[0], n.pos[0] + n.size[0] - width), Math.min(box[1], top), box[2], box[3]];
      }
      return { id: String(n.id), type: n.type, title: n.title, box, screen: toScreen(box), size: [...n.size],
               badges: badges.map((b) => b.text),
               widgets: Object.fromEntries((n.widgets || []).map((w) => [w.name, w.label ?? w.name])) };
    });
    // which required nodes a user cannot see: every sample point must be on the canvas (or a widget of the node
    // drawn over it), inside the window, not under the sidebar, menus, minimap or a dialog
    const covered = {};
    for (const n of nodes.filter((n) => required.includes(n.id))) {
      const [x0, y0, x1, y1] = n.screen;
      const bad = [];
      for (let i = 0; i <= 6; i++) {
        for (let j = 0; j <= 6; j++) {
          const x = x0 + 2 + (x1 - x0 - 4) * i / 6;
          const y = y0 + 2 + (y1 - y0 - 4) * j / 6;
          if (x < 0 || y < 0 || x >= window.innerWidth || y >= window.innerHeight) { bad.push(`off screen at ${Math.round(x)},${Math.round(y)}`); continue; }
          const el = document.elementFromPoint(x, y);
          if (el === c.canvas || el?.closest('.dom-widget, .comfy-markdown, .comfy-multiline-input')) continue;
          bad.push(`${el?.tagName.toLowerCase()}.${[...(el?.classList || [])].slice(0, 2).join('.')} at ${Math.round(x)},${Math.round(y)}`);
        }
      }
      if (bad.length) covered[n.id] = bad.slice(0, 4);
    }
    const note = document.querySelector('.comfy-markdown .tiptap');
    const noteText = note ? [...note.children].map((e) => ({ tag: e.tagName, text: e.innerText.slice(0, 80),
      px: Math.round(parseFloat(getComputedStyle(e).fontSize) * scale * 10) / 10 })) : [];
    return { width: window.innerWidth, height: window.innerHeight, scale, offset: [ox, oy],
             low_quality: c.low_quality, min_font_size_for_lod: c.min_font_size_for_lod, nodes, covered,
             note: noteText, note_overflows: note ? note.scrollHeight > note.clientHeight + 2 : null };
  }, required);
}

async function useScreen({ width, height }) {
  // switch to the tab of this window size (opened with the app on first use); later commands act there
  const key = `${width}x${height}`;
  page = pages[key] ?? (await openPage({ width, height }));
  await page.bringToFront();
  await closeDialogs();
  return { screen: key, ...takeEvents() };
}

async function search({ query }) {
  // the node search box (double-click on an empty spot of the canvas), as a user searches
  const input = page.locator('.comfy-vue-node-search-container input').first();
  await page.keyboard.press('Escape');
  await input.waitFor({ state: 'hidden', timeout: 3000 }).catch(() => null);  // a previous search box has closed
  for (let i = 0; i < 3 && !(await input.isVisible().catch(() => false)); i++) {
    const spot = await page.evaluate(() => {
      const c = window.app.canvas;
      const [ox, oy] = c.ds.offset;
      const s = c.ds.scale;
      const boxes = window.app.graph.nodes.map((n) => n.boundingRect);
      const free = (x, y) => !boxes.some(([bx, by, bw, bh]) => x > (bx + ox) * s - 20 && x < (bx + bw + ox) * s + 20
        && y > (by + oy) * s - 20 && y < (by + bh + oy) * s + 20);
      for (let y = window.innerHeight - 120; y > 100; y -= 40)
        for (let x = window.innerWidth / 2; x > 80; x -= 40) if (free(x, y)) return [x, y];
      return [window.innerWidth / 2, window.innerHeight - 150];
    });
    await page.mouse.dblclick(spot[0], spot[1]);
    await input.waitFor({ timeout: 3000 }).catch(() => null);
  }
  await input.fill(query);
  // the results update after a short debounce: wait for the list to show this query's rows and settle
  let previous = null;
  for (let i = 0; i < 30; i++) {
    await page.waitForTimeout(200);
    const now = await page.locator('[role="option"]').evaluateAll((els) => els.map((e) => e.innerText).join('|'));
    if (now && now === previous) break;
    previous = now;
  }
  const results = await page.locator('[role="option"]').evaluateAll(
    (els) => els.map((e) => e.innerText.replace(/\s+/g, ' ').trim()));
  await page.keyboard.press('Escape');
  await input.waitFor({ state: 'hidden', timeout: 3000 }).catch(() => null);
  await settle();
  // the search box's own console noise (primevue's autocomplete after Escape) belongs to this command only
  const events = takeEvents();
  return { query, results, console: [...events.errors, ...events.ignored] };
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
  // (the editor loads a node's images when it draws the node: results beyond the screen's edge need the user to
  // look there, so when they do not show at the opened view, the view is fitted to the whole graph once)
  const outputIds = Object.keys(entry.outputs || {}).filter((k) => entry.outputs[k].images?.length);
  const imagesShown = (timeout) => page.waitForFunction((outputs) => {
    const nodes = window.app.graph.nodes.filter((n) => outputs.includes(String(n.id)));
    return nodes.every((n) => n.imgs?.length > 0) ? nodes.map((n) => String(n.id)) : false;
  }, outputIds, { timeout }).then((h) => h.jsonValue()).catch(() => null);
  let shown = await imagesShown(10000);
  if (!shown) {
    await page.evaluate(() => window.app.extensionManager.command.execute('Comfy.Canvas.FitView'));
    shown = await imagesShown(30000);
  }
  await settle();
  if (screenshot) {
    fs.mkdirSync(path.dirname(screenshot), { recursive: true });
    await page.screenshot({ path: screenshot });
  }
  // what the nodes show under themselves (the server's progress text: warnings and notes of the run)
  const node_texts = await page.evaluate(() => Object.fromEntries(window.app.graph.nodes
    .map((n) => [String(n.id), (n.widgets || []).find((w) => w.name === '$$node-text-preview')?.value])
    .filter(([, v]) => v)));
  return { queued: true, prompt_id: id, node_errors: queued.node_errors, finished: true,
           status: entry.status?.status_str ?? null, seconds, images_shown_on: shown, node_texts, ...takeEvents() };
}

async function templates() {
  // the template browser's list of custom-node templates: {pack folder: [workflow names]}
  return { templates: await page.evaluate(() => window.app.api.getWorkflowTemplates()) };
}

async function shot({ path: file, fit = false }) {
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
const handlers = { load, queue, templates, screenshot: shot, open_template: openTemplate, view, screen: useScreen, search };
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
