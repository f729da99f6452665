#!/usr/bin/env node
// Drive the demo dashboard in Debian's chromium and report what it showed.
//
//   node tests/browser/dashboard.mjs [--timeout MS] [--deadline MS] [--config JSON]
//        [--chart-config JSON] [--screenshot PATH] [--restart] [--reset] URL
//
// Steps: load the page, wait for both panels (the "prices" grid, and "orders" charted) and take
// the screenshot; read the "prices" grid twice (it must change); pick "orders" in the table
// picker; restore --config (a viewer configuration on "orders") into the table panel and
// --chart-config into the chart panel, and read the grid and the chart's configuration. With
// --restart, print {"event": "restart"} and wait for the page to report the disconnect,
// reconnect and show both panels again (the caller restarts the server meanwhile), then pick
// "prices". With --reset, click "reset layout", then read the grid and the chart's
// configuration. When the page shows no chart (the server hosts no "orders"), the run ends
// once the page is loaded. Stdout carries JSON lines: that event, then the results, or
// {"ok": false, ...} with exit code 1. Each wait is bounded by --timeout and the whole run by
// --deadline.

import { CHART, Dashboard, Run, out, parseArgs } from "./_page.mjs";

const USAGE =
    "usage: node dashboard.mjs [--timeout MS] [--deadline MS] [--config JSON] " +
    "[--chart-config JSON] [--screenshot PATH] [--restart] [--reset] URL";
// What "reset layout" must put back (checked in full by the caller).
const DEFAULT_TABLE = { table: "prices", plugin: "Datagrid", group_by: [] };
const DEFAULT_CHART = { table: "orders", plugin: "Y Bar", group_by: ["region"] };

async function main(run) {
    const opts = parseArgs(process.argv.slice(2), USAGE, {
        "--config": ["config", JSON.parse], "--chart-config": ["chartConfig", JSON.parse],
        "--screenshot": ["screenshot", String], "--restart": ["restart", null],
        "--reset": ["reset", null],
    }, { config: null, chartConfig: null, screenshot: null, restart: false, reset: false });
    run.limit(opts.deadline);
    const result = run.result;

    await run.launch(opts.timeout);
    const dashboard = await Dashboard.open(run, opts.timeout);
    const page = dashboard.page;

    run.stage = "load";
    await page.goto(opts.url);
    const first = await dashboard.settled();
    // Settled means attached: the panels the page shows are all there.
    const panels = await dashboard.panels();
    result.initial = {
        table: await page.inputValue("#table"),
        options: await page.$$eval("#table option", (options) => options.map((o) => o.value)),
        status: await page.textContent("#status"),
        panels,
        config: first.config,
        grid: first.grid,
        chart: panels.includes("chart-panel") ? await dashboard.chartSettled() : null,
    };
    run.mark("loaded");

    if (opts.screenshot !== null) {
        // The page as it opens: the live table and the chart.
        run.stage = "screenshot";
        await page.screenshot({ path: opts.screenshot });
        run.mark("screenshot");
    }
    if (result.initial.chart === null) {
        // No "orders" on the server: nothing more to do than show its tables.
        run.stage = "done";
        await run.finish(0);
        return;
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
    // The picker chooses the table panel's table only.
    result.switched = {
        table: switched.config.table, grid: switched.grid, chart: await dashboard.save(CHART),
    };
    run.mark("switched");

    if (opts.config !== null || opts.chartConfig !== null) {
        run.stage = "configure";
        if (opts.config !== null) await dashboard.restore(opts.config);
        if (opts.chartConfig !== null) await dashboard.restore(opts.chartConfig, CHART);
        result.configured = await dashboard.settled();
        result.configured.chart = await dashboard.save(CHART);
        run.mark("configured");
    }

    if (opts.restart) {
        run.stage = "restart";
        const logged = await page.evaluate(() => window.__dashboard.statusLog.length);
        const before = { ...(await dashboard.settled()), chart: await dashboard.chartSettled() };
        out(JSON.stringify({ event: "restart" }) + "\n");
        // First the page must notice the server went away...
        await dashboard.waitFor("the page reports the disconnect",
            (from) => window.__dashboard.statusLog.slice(from).some((e) => e.state === "closed"),
            logged);
        run.mark("disconnected");
        // ...then come back by itself, with both panels as they were.
        run.stage = "reconnect";
        const after = await dashboard.settled();
        after.chart = await dashboard.chartSettled();
        run.mark("reconnected");
        const status_log = await page.evaluate(
            (from) => window.__dashboard.statusLog.slice(from), logged,
        );
        // The picker works on the new connection too.
        run.stage = "switch after reconnect";
        const picked = await dashboard.pick("prices");
        result.restart = { before, after, status_log, picked };
    }

    if (opts.reset) {
        run.stage = "reset";
        result.reset = await dashboard.resetLayout(DEFAULT_TABLE, DEFAULT_CHART);
        run.mark("reset");
    }

    run.stage = "done";
    await run.finish(0);
}

const run = new Run();
main(run).catch((error) => run.fail(error));
