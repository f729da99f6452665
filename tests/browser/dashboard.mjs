#!/usr/bin/env node
// Drive the demo dashboard in Debian's chromium and report what it showed.
//
//   node tests/browser/dashboard.mjs [--timeout MS] [--deadline MS] [--config JSON]
//        [--screenshot PATH] [--restart] URL
//
// Steps: load the page and take the screenshot; read the "prices" grid twice (it must
// change); pick "orders" in the table picker; restore --config (a viewer configuration on
// "orders") and read the grid. With --restart, print {"event": "restart"} and wait for the
// page to report the disconnect, reconnect and show the grid again (the caller restarts the
// server meanwhile), then pick "prices". Stdout carries JSON lines: that event, then the
// results, or {"ok": false, ...} with exit code 1. Each wait is bounded by --timeout and the
// whole run by --deadline.

import { createRequire } from "node:module";

const require = createRequire(import.meta.url);
const { chromium } = require("playwright-core");

const USAGE =
    "usage: node dashboard.mjs [--timeout MS] [--deadline MS] [--config JSON] " +
    "[--screenshot PATH] [--restart] URL";
const CHROMIUM = "/usr/bin/chromium";
const CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run",
];

// Stdout is for our JSON lines only.
const out = process.stdout.write.bind(process.stdout);
for (const name of ["log", "info", "debug", "warn"]) {
    console[name] = (...args) => console.error(...args);
}

function parseArgs(argv) {
    const opts = { timeout: 20000, deadline: 80000, config: null, screenshot: null,
                   restart: false, url: null };
    for (let i = 0; i < argv.length; i++) {
        const arg = argv[i];
        const value = () => {
            if (i + 1 >= argv.length) throw new Error(`${arg} needs a value\n${USAGE}`);
            return argv[++i];
        };
        if (arg === "--timeout") opts.timeout = Number(value());
        else if (arg === "--deadline") opts.deadline = Number(value());
        else if (arg === "--config") opts.config = JSON.parse(value());
        else if (arg === "--screenshot") opts.screenshot = value();
        else if (arg === "--restart") opts.restart = true;
        else if (arg.startsWith("--")) throw new Error(`unknown option ${arg}\n${USAGE}`);
        else if (opts.url === null) opts.url = arg;
        else throw new Error(USAGE);
    }
    if (opts.url === null) throw new Error(USAGE);
    return opts;
}

// Runs in the page before its own scripts: a log of the status line, and a reader of the
// grid's cells (the datagrid keeps its <regular-table> in its shadow root).
function instrumentPage() {
    const log = [];
    window.__dashboard = {
        statusLog: log,
        readGrid() {
            const viewer = document.querySelector("perspective-viewer");
            const datagrid = viewer?.querySelector("perspective-viewer-datagrid");
            const table = datagrid?.shadowRoot?.querySelector("regular-table");
            if (!table) return null;
            const text = (cell) => cell.textContent.trim();
            const headRows = table.querySelectorAll("thead tr");
            const last = headRows[headRows.length - 1];
            return {
                headers: last ? [...last.querySelectorAll("th")].map(text) : [],
                rows: [...table.querySelectorAll("tbody tr")].map(
                    (row) => [...row.querySelectorAll("th, td")].map(text),
                ),
            };
        },
    };
    document.addEventListener("DOMContentLoaded", () => {
        const status = document.getElementById("status");
        const record = () => {
            const entry = { state: status.dataset.state, text: status.textContent };
            const previous = log[log.length - 1];
            if (!previous || previous.state !== entry.state || previous.text !== entry.text) {
                log.push(entry);
            }
        };
        record();
        new MutationObserver(record).observe(status, {
            attributes: true, childList: true, characterData: true, subtree: true,
        });
    });
}

let stage = "init";
let finished = false;
let browser = null;

async function finish(obj, code) {
    if (finished) return;
    finished = true;
    const closing = browser?.close().catch(() => {});
    // Do not let a hung browser outlive the report.
    await Promise.race([closing, new Promise((resolve) => setTimeout(resolve, 5000))]);
    out(JSON.stringify(obj) + "\n", () => process.exit(code));
}

function fail(error) {
    const message = error instanceof Error ? `${error.message}\n${error.stack}` : String(error);
    finish({ ...(globalThis.__partial ?? {}), ok: false, stage, error: message }, 1);
}

process.on("uncaughtException", fail);
process.on("unhandledRejection", fail);

async function main() {
    const opts = parseArgs(process.argv.slice(2));
    setTimeout(() => fail(new Error(`still running after --deadline ${opts.deadline} ms`)),
               opts.deadline).unref();
    const started = Date.now();
    const result = { ok: true, errors: { page: [], console: [], requests: [] }, timings: {} };
    globalThis.__partial = result;
    const mark = (name) => { result.timings[name] = Date.now() - started; };
    // Errors are filed under the step that was running, so the caller can tell a reconnection
    // attempt to a stopped server from a fault.
    const note = (kind, entry) => result.errors[kind].push({ stage, ...entry });

    stage = "launch";
    browser = await chromium.launch({
        executablePath: CHROMIUM, headless: true, args: CHROMIUM_ARGS, timeout: opts.timeout,
    });
    const context = await browser.newContext({
        viewport: { width: 1280, height: 720 }, locale: "en-US", timezoneId: "UTC",
    });
    context.setDefaultTimeout(opts.timeout);
    const page = await context.newPage();
    await page.addInitScript(instrumentPage);
    page.on("pageerror", (error) => note("page", { message: String(error) }));
    page.on("console", (message) => {
        if (message.type() === "error") note("console", { message: message.text() });
    });
    page.on("requestfailed", (request) => note("requests", {
        url: request.url(), failure: request.failure()?.errorText ?? "",
    }));
    page.on("response", (response) => {
        if (response.status() >= 400) {
            note("requests", { url: response.url(), failure: `HTTP ${response.status()}` });
        }
    });

    const readGrid = () => page.evaluate(() => window.__dashboard.readGrid());
    const save = () => page.evaluate(() => document.querySelector("perspective-viewer").save());
    // Polls `predicate` (which may be async) in the page until it returns something truthy,
    // and returns that; fails after `timeout` ms.
    const waitFor = async (what, predicate, arg = null, timeout = opts.timeout) => {
        const until = Date.now() + timeout;
        for (;;) {
            const value = await page.evaluate(predicate, arg);
            if (value) return value;
            if (Date.now() > until) throw new Error(`timed out after ${timeout} ms: ${what}`);
            await new Promise((resolve) => setTimeout(resolve, 50));
        }
    };
    // Waits until the viewer is connected and its grid shows rows of the configured columns.
    const settled = () => waitFor("the grid shows the viewer's table",
        async () => {
            const viewer = document.querySelector("perspective-viewer");
            if (document.getElementById("status").dataset.state !== "open") return null;
            if (typeof viewer.flush !== "function") return null;  // not defined yet
            await viewer.flush();
            const config = await viewer.save();
            const grid = window.__dashboard.readGrid();
            const shown = grid?.headers.slice(-config.columns.length);
            const ready = grid !== null && grid.rows.length > 0 &&
                JSON.stringify(shown) === JSON.stringify(config.columns);
            return ready ? { config, grid } : null;
        });

    stage = "load";
    await page.goto(opts.url);
    const first = await settled();
    result.initial = {
        table: await page.inputValue("#table"),
        options: await page.$$eval("#table option", (options) => options.map((o) => o.value)),
        status: await page.textContent("#status"),
        config: first.config,
        grid: first.grid,
    };
    mark("loaded");

    if (opts.screenshot !== null) {
        // The page as it opens: the live table.
        stage = "screenshot";
        await page.screenshot({ path: opts.screenshot });
        mark("screenshot");
    }

    stage = "live";
    // The "prices" table is updated by the server all the time: the cells must follow.
    const before = JSON.stringify(first.grid.rows);
    await waitFor("the prices grid changes",
        (previous) => JSON.stringify(window.__dashboard.readGrid()?.rows) !== previous, before);
    result.live = { before: first.grid.rows, after: (await readGrid()).rows };
    mark("live");

    // Picks `name` in the page's table picker and waits for the grid to show it.
    const pick = async (name) => {
        await page.selectOption("#table", name);
        await waitFor(`the viewer shows ${name}`, async (wanted) =>
            (await document.querySelector("perspective-viewer").save()).table === wanted, name);
        return settled();
    };

    stage = "switch";
    const switched = await pick("orders");
    result.switched = { table: switched.config.table, grid: switched.grid };
    mark("switched");

    if (opts.config !== null) {
        stage = "configure";
        await page.evaluate(
            (config) => document.querySelector("perspective-viewer").restore(config), opts.config,
        );
        const configured = await settled();
        result.configured = configured;
        mark("configured");
    }

    if (opts.restart) {
        stage = "restart";
        const logged = await page.evaluate(() => window.__dashboard.statusLog.length);
        const before = await settled();
        out(JSON.stringify({ event: "restart" }) + "\n");
        // First the page must notice the server went away...
        await waitFor("the page reports the disconnect",
            (from) => window.__dashboard.statusLog.slice(from).some((e) => e.state === "closed"),
            logged);
        mark("disconnected");
        // ...then come back by itself, with the same configuration.
        stage = "reconnect";
        const after = await settled();
        mark("reconnected");
        const status_log = await page.evaluate(
            (from) => window.__dashboard.statusLog.slice(from), logged,
        );
        // The picker works on the new connection too.
        stage = "switch after reconnect";
        const picked = await pick("prices");
        result.restart = { before, after, status_log, picked };
    }

    stage = "done";
    await finish(result, 0);
}

main().catch(fail);
