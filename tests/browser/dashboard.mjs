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

import { Dashboard, Run, out, parseArgs } from "./_page.mjs";

const USAGE =
    "usage: node dashboard.mjs [--timeout MS] [--deadline MS] [--config JSON] " +
    "[--screenshot PATH] [--restart] URL";

async function main(run) {
    const opts = parseArgs(process.argv.slice(2), USAGE, {
        "--config": ["config", JSON.parse], "--screenshot": ["screenshot", String],
        "--restart": ["restart", null],
    }, { config: null, screenshot: null, restart: false });
    run.limit(opts.deadline);
    const result = run.result;

    await run.launch(opts.timeout);
    const dashboard = await Dashboard.open(run, opts.timeout);
    const page = dashboard.page;

    run.stage = "load";
    await page.goto(opts.url);
    const first = await dashboard.settled();
    result.initial = {
        table: await page.inputValue("#table"),
        options: await page.$$eval("#table option", (options) => options.map((o) => o.value)),
        status: await page.textContent("#status"),
        config: first.config,
        grid: first.grid,
    };
    run.mark("loaded");

    if (opts.screenshot !== null) {
        // The page as it opens: the live table.
        run.stage = "screenshot";
        await page.screenshot({ path: opts.screenshot });
        run.mark("screenshot");
    }

    run.stage = "live";
    // The "prices" table is updated by the server all the time: the cells must follow.
    const before = JSON.stringify(first.grid.rows);
    await dashboard.waitFor("the prices grid changes",
        (previous) => JSON.stringify(window.__dashboard.readGrid()?.rows) !== previous, before);
    result.live = { before: first.grid.rows, after: (await dashboard.readGrid()).rows };
    run.mark("live");

    run.stage = "switch";
    const switched = await dashboard.pick("orders");
    result.switched = { table: switched.config.table, grid: switched.grid };
    run.mark("switched");

    if (opts.config !== null) {
        run.stage = "configure";
        await dashboard.restore(opts.config);
        result.configured = await dashboard.settled();
        run.mark("configured");
    }

    if (opts.restart) {
        run.stage = "restart";
        const logged = await page.evaluate(() => window.__dashboard.statusLog.length);
        const before = await dashboard.settled();
        out(JSON.stringify({ event: "restart" }) + "\n");
        // First the page must notice the server went away...
        await dashboard.waitFor("the page reports the disconnect",
            (from) => window.__dashboard.statusLog.slice(from).some((e) => e.state === "closed"),
            logged);
        run.mark("disconnected");
        // ...then come back by itself, with the same configuration.
        run.stage = "reconnect";
        const after = await dashboard.settled();
        run.mark("reconnected");
        const status_log = await page.evaluate(
            (from) => window.__dashboard.statusLog.slice(from), logged,
        );
        // The picker works on the new connection too.
        run.stage = "switch after reconnect";
        const picked = await dashboard.pick("prices");
        result.restart = { before, after, status_log, picked };
    }

    run.stage = "done";
    await run.finish(0);
}

const run = new Run();
main(run).catch((error) => run.fail(error));
