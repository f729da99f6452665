#!/usr/bin/env node
// Drive the stock Perspective JS client against a websocket URL.
//
//   node tests/js/scenario.mjs --flavour v4|v5 [--timeout MS] [--row JSON] [--read-only]
//                              URL [TABLE]
//
// With --read-only the update is expected to be refused: its error message is
// reported as update_refused.
//
// The client package is loaded from tests/js/<flavour>/node_modules (see
// install.sh).  Stdout carries exactly one JSON line: the results, or
// {"ok": false, "error": ...} with exit code 1.  Everything the client logs
// itself goes to stderr.

import { readFileSync } from "node:fs";
import path from "node:path";
import { fileURLToPath } from "node:url";

import { loadFrom, withTimeout } from "./_load.mjs";

const HERE = path.dirname(fileURLToPath(import.meta.url));
const USAGE =
    "usage: node scenario.mjs --flavour v4|v5 [--timeout MS] [--row JSON] [--read-only] URL [TABLE]";

// Keep stdout for our single JSON line: the client logs with console.debug
// (e.g. "Closing WebSocket" on terminate), which Node writes to stdout.
const out = process.stdout.write.bind(process.stdout);
for (const name of ["log", "info", "debug", "warn"]) {
    console[name] = (...args) => console.error(...args);
}

let stage = "init";
let finished = false;
let client = null;

function emit(obj, code) {
    if (finished) return;
    finished = true;
    const line =
        JSON.stringify(obj, (_k, v) => (typeof v === "bigint" ? Number(v) : v)) + "\n";
    out(line, () => process.exit(code));
}

function fail(err) {
    const error = err instanceof Error ? err.message : String(err);
    const report = () => emit({ ok: false, stage, error }, 1);
    // Best effort: send a close frame so the server sees a clean disconnect.
    const c = client;
    client = null;
    if (c && !finished) {
        Promise.resolve()
            .then(() => c.terminate())
            .catch(() => {})
            .finally(report);
        setTimeout(report, 1000);
    } else {
        report();
    }
}

process.on("uncaughtException", fail);
process.on("unhandledRejection", fail);

function parseArgs(argv) {
    const opts = {
        flavour: "v5", timeout: 5000, row: null, readOnly: false, table: "demo", url: null,
    };
    const positional = [];
    for (let i = 0; i < argv.length; i++) {
        const a = argv[i];
        const value = () => {
            if (i + 1 >= argv.length) throw new Error(`${a} needs a value; ${USAGE}`);
            return argv[++i];
        };
        if (a === "--flavour") opts.flavour = value();
        else if (a.startsWith("--flavour=")) opts.flavour = a.slice(10);
        else if (a === "--timeout") opts.timeout = Number(value());
        else if (a === "--row") opts.row = JSON.parse(value());
        else if (a === "--read-only") opts.readOnly = true;
        else if (a === "-h" || a === "--help") throw new Error(USAGE);
        else if (a.startsWith("--")) throw new Error(`unknown option ${a}; ${USAGE}`);
        else positional.push(a);
    }
    if (positional.length < 1 || positional.length > 2) throw new Error(USAGE);
    [opts.url, opts.table = "demo"] = positional;
    if (!/^v[0-9]+$/.test(opts.flavour)) throw new Error(`bad flavour ${opts.flavour}`);
    if (!(opts.timeout > 0)) throw new Error("--timeout must be a positive number");
    return opts;
}

// A row for `table.update` built from the schema.  With an integer index the
// new key is max(existing) + 1, so the table grows by one row.
function makeRow(schema, index, maxIndex) {
    const row = {};
    for (const [col, type] of Object.entries(schema)) {
        switch (type) {
            case "integer":
                row[col] = col === index ? (maxIndex ?? 0) + 1 : 7;
                break;
            case "float":
                row[col] = 42.5;
                break;
            case "string":
                row[col] = col === index ? `js-${Date.now()}` : "from-js";
                break;
            case "boolean":
                row[col] = true;
                break;
            case "date":
            case "datetime":
                row[col] = Date.UTC(2024, 0, 2);
                break;
            default:
                row[col] = null;
        }
    }
    return row;
}

async function main() {
    stage = "args";
    const opts = parseArgs(process.argv.slice(2));
    const flavourDir = path.join(HERE, opts.flavour);

    stage = "load";
    const { default: WebSocket } = await loadFrom(flavourDir, "ws");
    // Node 20 has no global WebSocket.  (The client's node entry imports
    // `ws` itself, but set the global first in case a build looks for it.)
    globalThis.WebSocket ??= WebSocket;
    const mod = await loadFrom(flavourDir, "@perspective-dev/client");
    const perspective = mod.default ?? mod;
    const clientVersion = JSON.parse(
        readFileSync(
            path.join(flavourDir, "node_modules/@perspective-dev/client/package.json"),
            "utf8",
        ),
    ).version;

    const T = opts.timeout;
    // Overall watchdog, in case some call without its own timeout hangs.
    setTimeout(() => fail(new Error(`scenario timed out after ${8 * T} ms`)), 8 * T).unref();
    const result = { ok: true, flavour: opts.flavour, client_version: clientVersion, url: opts.url };

    stage = "connect";
    client = await withTimeout(perspective.websocket(opts.url), T, "connect");
    const errors = [];
    try {
        // The callback gets (message, reconnect_fn); keep the message only.
        await client.on_error((message) => errors.push(String(message?.message ?? message)));
    } catch {
        /* optional */
    }

    stage = "get_hosted_table_names";
    result.tables = await withTimeout(client.get_hosted_table_names(), T, stage);

    stage = "open_table";
    result.table = opts.table;
    const table = await withTimeout(client.open_table(opts.table), T, stage);

    stage = "table_meta";
    result.size_before = await table.size();
    result.schema = await table.schema();
    result.index = (await table.get_index()) ?? null;
    result.columns = await table.columns();
    const cols = Object.keys(result.schema);

    // A flat view sorted by the index (or first column), descending.
    stage = "view_sorted";
    const sortCol = result.index ?? cols[0];
    const view = await table.view({ sort: [[sortCol, "desc"]] });
    const sortedBefore = await view.to_json();
    result.rows_before = sortedBefore.slice(0, 5);

    // A grouped view on the first string column (if any).
    stage = "view_group_by";
    const groupCol = cols.find((c) => result.schema[c] === "string" && c !== result.index);
    let grouped = null;
    if (groupCol) {
        grouped = await table.view({ group_by: [groupCol], columns: cols.filter((c) => c !== groupCol) });
        result.group_by = groupCol;
        result.grouped_columns = await grouped.to_columns();
        result.grouped_num_rows = await grouped.num_rows();
    }

    stage = "on_update";
    const calls = [];
    let resolveUpdate;
    const updated = new Promise((r) => (resolveUpdate = r));
    const cbId = await view.on_update((resp) => {
        calls.push({
            port_id: resp?.port_id ?? null,
            keys: resp && typeof resp === "object" ? Object.keys(resp) : [],
        });
        resolveUpdate();
    });

    stage = "update";
    const maxIndex =
        result.index && result.schema[result.index] === "integer" && sortedBefore.length
            ? sortedBefore[0][result.index]
            : null;
    const row = opts.row ?? makeRow(result.schema, result.index, maxIndex);
    result.update_row = row;
    if (opts.readOnly) {
        result.update_refused = null;
        try {
            await withTimeout(table.update([row]), T, "table.update");
        } catch (e) {
            result.update_refused = String(e?.message ?? e);
        }
    } else {
        await withTimeout(table.update([row]), T, "table.update");

        stage = "wait_on_update";
        try {
            await withTimeout(updated, T, "on_update callback");
        } catch {
            /* reported as on_update_fired: false */
        }
    }
    result.on_update_fired = calls.length > 0;
    result.on_update_calls = calls;

    stage = "after_update";
    result.size_after = await table.size();
    result.rows_after = (await view.to_json()).slice(0, 5);
    result.to_columns_after = await view.to_columns({ start_row: 0, end_row: 5 });

    stage = "cleanup";
    await view.remove_update(cbId);
    await view.delete();
    if (grouped) await grouped.delete();
    result.client_errors = errors;

    stage = "terminate";
    const c = client;
    client = null;
    await c.terminate();
    return result;
}

main().then(
    (result) => emit(result, 0),
    (err) => fail(err),
);
