#!/usr/bin/env node
// Three pages of the demo dashboard in Debian's chromium, one browser context each, on one
// server: report what each showed, and the server's /metrics, at each step.
//
//   node tests/browser/shared.mjs [--timeout MS] [--deadline MS] --config JSON --pivot JSON URL
//
// Steps: load the three pages (they open on the "prices" grid and the "orders" chart); on
// each, pick "orders" and restore --config in the table panel; on the first only, restore
// --pivot (a grouped configuration) there; then make the other two draw their grids afresh
// and read them again. Stdout carries one JSON line: the results, or {"ok": false, ...} with
// exit code 1. Each wait is bounded by --timeout and the whole run by --deadline.

import { Dashboard, Run, TABLE, parseArgs } from "./_page.mjs";

const USAGE =
    "usage: node shared.mjs [--timeout MS] [--deadline MS] --config JSON --pivot JSON URL";
const PAGES = 3;

async function main(run) {
    const opts = parseArgs(process.argv.slice(2), USAGE, {
        "--config": ["config", JSON.parse], "--pivot": ["pivot", JSON.parse],
    }, { config: null, pivot: null });
    if (opts.config === null || opts.pivot === null) throw new Error(USAGE);
    run.limit(opts.deadline);
    const result = run.result;
    const metrics = async () => {
        const response = await fetch(new URL("/metrics", opts.url));
        if (!response.ok) throw new Error(`/metrics answered ${response.status}`);
        return response.text();
    };

    await run.launch(opts.timeout);
    const pages = [];
    for (let number = 1; number <= PAGES; number++) {
        pages.push(await Dashboard.open(run, opts.timeout, number));
    }

    run.stage = "load";
    const load = async (dashboard) => {
        await dashboard.page.goto(opts.url);
        return dashboard.settled();
    };
    // All three at once, as pages reconnecting after a server restart do: a view asked for
    // while another connection is making it waits for that one, so each is made once.
    const loaded = await Promise.all(pages.map(load));
    result.initial = { pages: loaded, metrics: await metrics() };
    run.mark("loaded");

    run.stage = "configure";
    const configured = [];
    for (const dashboard of pages) {
        await dashboard.pick("orders");
        await dashboard.restore(opts.config);
        configured.push(await dashboard.settled());
    }
    result.configured = { pages: configured, metrics: await metrics() };
    run.mark("configured");

    run.stage = "pivot";
    await pages[0].restore(opts.pivot);
    result.pivoted = { page: await pages[0].settled(), metrics: await metrics() };
    run.mark("pivoted");

    // The others are read again from the server: a forced resize redraws the grid from its
    // view, as a scroll or an update would.
    run.stage = "redraw";
    const redrawn = [];
    for (const dashboard of pages.slice(1)) {
        await dashboard.page.evaluate(
            (viewer) => document.querySelector(viewer).resize(true), TABLE,
        );
        redrawn.push(await dashboard.settled());
    }
    result.redrawn = { pages: redrawn, metrics: await metrics() };
    run.mark("redrawn");

    run.stage = "done";
    await run.finish(0);
}

const run = new Run();
main(run).catch((error) => run.fail(error));
