// What the browser scripts share: their one JSON report on stdout, Debian's chromium, and the
// demo dashboard in a page of it, instrumented and read with bounded waits.
//
// The dashboard has two panels, each a <perspective-viewer>: TABLE (a datagrid, the table the
// picker chooses) and CHART ("orders" charted, shown when the server hosts "orders").

import { createRequire } from "node:module";

const require = createRequire(import.meta.url);
const { chromium } = require("playwright-core");

const CHROMIUM = "/usr/bin/chromium";
const CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run",
];

export const TABLE = "#table-panel perspective-viewer";
export const CHART = "#chart-panel perspective-viewer";
// A pixel counts as drawn in a series' colour when its channels differ by this much: greys
// (axes, labels, gridlines) and white do not.
const SATURATED = 64;

// Stdout is for our JSON lines only.
export const out = process.stdout.write.bind(process.stdout);
for (const name of ["log", "info", "debug", "warn"]) {
    console[name] = (...args) => console.error(...args);
}

// Reads `argv` against `options`, which maps each option to [key, parse] (parse null: a flag);
// every script also takes --timeout and --deadline, and one URL.
export function parseArgs(argv, usage, options, defaults) {
    const spec = { "--timeout": ["timeout", Number], "--deadline": ["deadline", Number], ...options };
    const opts = { timeout: 20000, deadline: 80000, ...defaults, url: null };
    for (let i = 0; i < argv.length; i++) {
        const arg = argv[i];
        const known = spec[arg];
        if (known !== undefined) {
            const [key, parse] = known;
            if (parse === null) {
                opts[key] = true;
            } else {
                if (i + 1 >= argv.length) throw new Error(`${arg} needs a value\n${usage}`);
                opts[key] = parse(argv[++i]);
            }
        } else if (arg.startsWith("--")) throw new Error(`unknown option ${arg}\n${usage}`);
        else if (opts.url === null) opts.url = arg;
        else throw new Error(usage);
    }
    if (opts.url === null) throw new Error(usage);
    return opts;
}

// One run of a script: its results, the step running (`stage`), and its report, printed once,
// after the browser is closed.
export class Run {
    constructor() {
        this.stage = "init";
        this.browser = null;
        this.started = Date.now();
        this.result = { ok: true, errors: { page: [], console: [], requests: [] }, timings: {} };
        this._finished = false;
        const fail = (error) => this.fail(error);
        process.on("uncaughtException", fail);
        process.on("unhandledRejection", fail);
    }

    // Fails the run if it is still going after `deadline` ms.
    limit(deadline) {
        setTimeout(() => this.fail(new Error(`still running after --deadline ${deadline} ms`)),
                   deadline).unref();
    }

    mark(name) {
        this.result.timings[name] = Date.now() - this.started;
    }

    // Errors are filed under the step that was running, so the caller can tell a reconnection
    // attempt to a stopped server from a fault.
    note(kind, entry) {
        this.result.errors[kind].push({ stage: this.stage, ...entry });
    }

    async launch(timeout) {
        this.stage = "launch";
        this.browser = await chromium.launch({
            executablePath: CHROMIUM, headless: true, args: CHROMIUM_ARGS, timeout,
        });
        return this.browser;
    }

    async finish(code = 0) {
        if (this._finished) return;
        this._finished = true;
        const closing = this.browser?.close().catch(() => {});
        // Do not let a hung browser outlive the report.
        await Promise.race([closing, new Promise((resolve) => setTimeout(resolve, 5000))]);
        out(JSON.stringify(this.result) + "\n", () => process.exit(code));
    }

    fail(error) {
        const message = error instanceof Error ? `${error.message}\n${error.stack}` : String(error);
        Object.assign(this.result, { ok: false, stage: this.stage, error: message });
        this.finish(1);
    }
}

// Runs in the page before its own scripts: a log of the status line, and a reader of the
// grid's cells (the datagrid keeps its <regular-table> in its shadow root).
function instrumentPage() {
    const log = [];
    window.__dashboard = {
        statusLog: log,
        readGrid() {
            const viewer = document.querySelector("#table-panel perspective-viewer");
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

// The dashboard in a page of its own browser context; its errors go to `run`, with `label`
// (when given) to say which page had them.
export class Dashboard {
    static async open(run, timeout, label = null) {
        const context = await run.browser.newContext({
            viewport: { width: 1280, height: 720 }, locale: "en-US", timezoneId: "UTC",
        });
        context.setDefaultTimeout(timeout);
        const page = await context.newPage();
        await page.addInitScript(instrumentPage);
        const note = (kind, entry) => run.note(kind, label === null ? entry : { label, ...entry });
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
        return new Dashboard(page, timeout);
    }

    constructor(page, timeout) {
        this.page = page;
        this.timeout = timeout;
    }

    readGrid() {
        return this.page.evaluate(() => window.__dashboard.readGrid());
    }

    save(viewer = TABLE) {
        return this.page.evaluate((viewer) => document.querySelector(viewer).save(), viewer);
    }

    restore(config, viewer = TABLE) {
        return this.page.evaluate(
            ([config, viewer]) => document.querySelector(viewer).restore(config), [config, viewer],
        );
    }

    // The ids of the panels shown, in page order.
    panels() {
        return this.page.$$eval("main > .panel", (panels) =>
            panels.filter((panel) => !panel.hidden).map((panel) => panel.id));
    }

    // Clicks "reset layout", waits for both panels to show `table` and `chart` again, and
    // returns the table panel settled and the chart panel's configuration.
    async resetLayout(table, chart) {
        await this.page.click("#reset");
        for (const [viewer, wanted] of [[TABLE, table], [CHART, chart]]) {
            const what = `${viewer} shows ${wanted.table} as at first`;
            await this.waitFor(what, async ([viewer, wanted]) => {
                const config = await document.querySelector(viewer).save();
                return config.table === wanted.table && config.plugin === wanted.plugin &&
                    JSON.stringify(config.group_by) === JSON.stringify(wanted.group_by);
            }, [viewer, wanted]);
        }
        return { table: await this.settled(), chart: await this.save(CHART) };
    }

    // Polls `predicate` (which may be async) in the page until it returns something truthy,
    // and returns that; fails after `timeout` ms.
    async waitFor(what, predicate, arg = null, timeout = this.timeout) {
        const until = Date.now() + timeout;
        for (;;) {
            const value = await this.page.evaluate(predicate, arg);
            if (value) return value;
            if (Date.now() > until) throw new Error(`timed out after ${timeout} ms: ${what}`);
            await new Promise((resolve) => setTimeout(resolve, 50));
        }
    }

    // Waits until the viewer is connected and its grid shows rows of the configured columns.
    settled() {
        return this.waitFor("the grid shows the viewer's table", async (selector) => {
            const viewer = document.querySelector(selector);
            if (document.getElementById("status").dataset.state !== "open") return null;
            if (typeof viewer.flush !== "function") return null;  // not defined yet
            await viewer.flush();
            const config = await viewer.save();
            const grid = window.__dashboard.readGrid();
            const shown = grid?.headers.slice(-config.columns.length);
            const ready = grid !== null && grid.rows.length > 0 &&
                JSON.stringify(shown) === JSON.stringify(config.columns);
            return ready ? { config, grid } : null;
        }, TABLE);
    }

    // Waits until the chart panel has drawn, and returns its configuration, its plugin's
    // element and canvases, and what a screenshot of it shows: `colored`, the share of pixels
    // in a series' colour, and `hues`, the share of each hue (in 30° steps) among all pixels.
    // Drawn means two screenshots in a row alike, with some colour: the chart plugin draws in
    // a worker, after the viewer's flush() resolves.
    async chartSettled() {
        const shown = await this.waitFor("the chart panel shows a chart", async (viewer) => {
            const element = document.querySelector(viewer);
            if (document.getElementById("status").dataset.state !== "open") return null;
            if (element.parentElement.hidden || typeof element.flush !== "function") return null;
            await element.flush();
            const plugin = await element.getPlugin();
            const nodes = (plugin.shadowRoot ?? plugin).querySelectorAll("canvas, svg");
            const canvases = [...nodes].map((node) => ({
                tag: node.tagName.toLowerCase(), class: node.getAttribute("class"),
                width: node.clientWidth, height: node.clientHeight,
            }));
            if (!canvases.some((canvas) => canvas.width > 0 && canvas.height > 0)) return null;
            return { config: await element.save(), plugin: plugin.tagName.toLowerCase(), canvases };
        }, CHART);
        const until = Date.now() + this.timeout;
        let previous = null;
        for (;;) {
            const drawn = await this.chartPixels();
            if (drawn.colored > 0 && JSON.stringify(drawn) === JSON.stringify(previous)) {
                return { ...shown, drawn };
            }
            if (Date.now() > until) {
                throw new Error(`timed out after ${this.timeout} ms: the chart draws ` +
                                JSON.stringify(drawn));
            }
            previous = drawn;
            await new Promise((resolve) => setTimeout(resolve, 50));
        }
    }

    // What the chart panel shows, from a screenshot of it: the pixels are those on screen,
    // whichever canvas (WebGL or 2D, in the page or a worker) drew them.
    async chartPixels() {
        const png = await this.page.locator(CHART).screenshot();
        return this.page.evaluate(async ([base64, saturated]) => {
            const bytes = Uint8Array.from(atob(base64), (char) => char.charCodeAt(0));
            const bitmap = await createImageBitmap(new Blob([bytes], { type: "image/png" }));
            const context = new OffscreenCanvas(bitmap.width, bitmap.height).getContext("2d");
            context.drawImage(bitmap, 0, 0);
            const { data } = context.getImageData(0, 0, bitmap.width, bitmap.height);
            const pixels = bitmap.width * bitmap.height;
            const counts = {};
            let colored = 0;
            for (let i = 0; i < data.length; i += 4) {
                const [r, g, b] = [data[i], data[i + 1], data[i + 2]];
                const max = Math.max(r, g, b);
                const range = max - Math.min(r, g, b);
                if (range < saturated) continue;
                colored += 1;
                const sector = max === r ? ((g - b) / range + 6) % 6
                    : max === g ? (b - r) / range + 2 : (r - g) / range + 4;
                const hue = (Math.round(sector * 2) % 12) * 30;
                counts[hue] = (counts[hue] ?? 0) + 1;
            }
            const round = (count) => Math.round((count / pixels) * 1e4) / 1e4;
            const hues = Object.fromEntries(
                Object.entries(counts).map(([hue, count]) => [hue, round(count)]));
            return { width: bitmap.width, height: bitmap.height, colored: round(colored), hues };
        }, [png.toString("base64"), SATURATED]);
    }

    // Picks `name` in the page's table picker and waits for the grid to show it.
    async pick(name) {
        await this.page.selectOption("#table", name);
        await this.waitFor(`the viewer shows ${name}`, async ([viewer, wanted]) =>
            (await document.querySelector(viewer).save()).table === wanted, [TABLE, name]);
        return this.settled();
    }
}
