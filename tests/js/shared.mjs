#!/usr/bin/env node
// Three stock Perspective JS clients make the same view of one table over one server.
//
//   node tests/js/shared.mjs --flavour v4|v5 [--timeout MS] --config JSON URL TABLE
//
// Each client connects, opens TABLE and makes a view of it with --config (a grouped one), and
// subscribes to its updates. Then: the first client updates the table (every callback must
// hear of it); the first client's view.set_depth(0) changes its view alone; the second client
// updates the table (every callback hears of it again); every client deletes its view and
// closes. Stdout carries JSON lines: after each step an {"event": NAME, ...} line with what
// each client's view reads (to_columns) and how many updates each callback heard, after which
// the script waits for a line on stdin (the caller looks at the server meanwhile); at the end
// the results, or {"ok": false, ...} with exit code 1. Everything the clients log goes to
// stderr. Each wait is bounded by --timeout, the whole run by 8 times that.

import path from "node:path";
import readline from "node:readline";
import { fileURLToPath } from "node:url";

import { loadFrom, withTimeout } from "./_load.mjs";

const HERE = path.dirname(fileURLToPath(import.meta.url));
const USAGE =
    "usage: node shared.mjs --flavour v4|v5 [--timeout MS] --config JSON URL TABLE";
const CLIENTS = 3;

// Keep stdout for our JSON lines: the client logs with console.debug, which Node writes there.
const out = process.stdout.write.bind(process.stdout);
for (const name of ["log", "info", "debug", "warn"]) {
    console[name] = (...args) => console.error(...args);
}

const json = (obj) => JSON.stringify(obj, (_k, v) => (typeof v === "bigint" ? Number(v) : v));

let stage = "init";
let finished = false;
const clients = [];

function emit(obj, code) {
    if (finished) return;
    finished = true;
    out(json(obj) + "\n", () => process.exit(code));
}

function fail(err) {
    const error = err instanceof Error ? `${err.message}\n${err.stack}` : String(err);
    const report = () => emit({ ok: false, stage, error }, 1);
    // Best effort: close frames, so the server sees clean disconnects.
    const closing = clients.splice(0).map((c) => Promise.resolve().then(() => c.terminate()));
    Promise.allSettled(closing).finally(report);
    setTimeout(report, 1000);
}

process.on("uncaughtException", fail);
process.on("unhandledRejection", fail);

function parseArgs(argv) {
    const opts = { flavour: null, timeout: 5000, config: null };
    const positional = [];
    for (let i = 0; i < argv.length; i++) {
        const a = argv[i];
        const value = () => {
            if (i + 1 >= argv.length) throw new Error(`${a} needs a value; ${USAGE}`);
            return argv[++i];
        };
        if (a === "--flavour") opts.flavour = value();
        else if (a === "--timeout") opts.timeout = Number(value());
        else if (a === "--config") opts.config = JSON.parse(value());
        else if (a.startsWith("--")) throw new Error(`unknown option ${a}; ${USAGE}`);
        else positional.push(a);
    }
    if (positional.length !== 2 || opts.config === null) throw new Error(USAGE);
    [opts.url, opts.table] = positional;
    if (!/^v[0-9]+$/.test(opts.flavour ?? "")) throw new Error(`bad flavour ${opts.flavour}`);
    if (!(opts.timeout > 0)) throw new Error("--timeout must be a positive number");
    return opts;
}

async function main() {
    stage = "args";
    const opts = parseArgs(process.argv.slice(2));
    const T = opts.timeout;
    setTimeout(() => fail(new Error(`timed out after ${8 * T} ms`)), 8 * T).unref();
    const flavourDir = path.join(HERE, opts.flavour);
    const lines = readline.createInterface({ input: process.stdin })[Symbol.asyncIterator]();

    stage = "load";
    const { default: WebSocket } = await loadFrom(flavourDir, "ws");
    globalThis.WebSocket ??= WebSocket;  // Node 20 has none
    const mod = await loadFrom(flavourDir, "@perspective-dev/client");
    const perspective = mod.default ?? mod;

    stage = "connect";
    const tables = [];
    const errors = [];
    for (let n = 0; n < CLIENTS; n++) {
        const client = await withTimeout(perspective.websocket(opts.url), T, "connect");
        clients.push(client);
        await client.on_error((message) => errors.push(String(message?.message ?? message)));
        tables.push(await withTimeout(client.open_table(opts.table), T, "open_table"));
    }

    stage = "view";
    const views = [];
    const heard = [];
    // Resolves once every callback has heard `count` updates.
    let wanted = 0;
    let allHeard = () => {};
    const heardAll = (count) => {
        wanted = count;
        return new Promise((resolve) => {
            allHeard = resolve;
            if (heard.every((n) => n >= wanted)) resolve();
        });
    };
    for (const table of tables) {
        const view = await withTimeout(table.view(opts.config), T, "table.view");
        const number = views.length;
        views.push(view);
        heard.push(0);
        await view.on_update(() => {
            heard[number] += 1;
            if (heard.every((n) => n >= wanted)) allHeard();
        });
    }
    const read = () => Promise.all(views.map((view) => withTimeout(view.to_columns(), T, "to_columns")));
    // Reports the clients' views, then waits for the caller to look at the server.
    const step = async (event, extra = {}) => {
        stage = event;
        out(json({ event, columns: await read(), heard: [...heard], ...extra }) + "\n");
        const { done } = await withTimeout(lines.next(), T, `the caller, after ${event}`);
        if (done) throw new Error(`stdin closed after ${event}`);
    };
    await step("made");

    stage = "update";
    const row = { id: 5, name: "epsilon", group: "x", value: 10.0 };
    await withTimeout(tables[0].update([row]), T, "table.update");
    await withTimeout(heardAll(1), T, "every on_update callback");
    await step("updated");

    stage = "set_depth";
    await withTimeout(views[0].set_depth(0), T, "view.set_depth");
    await step("set_depth");

    stage = "update again";
    const again = { id: 6, name: "zeta", group: "y", value: 20.0 };
    await withTimeout(tables[1].update([again]), T, "table.update");
    await withTimeout(heardAll(2), T, "every on_update callback, again");
    await step("updated again");

    stage = "close";
    for (const view of views) await withTimeout(view.delete(), T, "view.delete");
    for (const client of clients.splice(0)) await client.terminate();
    return { ok: true, client_errors: errors, heard };
}

main().then((result) => emit(result, 0), fail);
