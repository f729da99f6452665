// The demo dashboard: two <perspective-viewer> panels on the server's Perspective websocket,
// a table (the live "prices" at first) and "orders" charted.
//
// <body> names what to load: data-websocket is the websocket's path, data-bundle the viewer
// bundle, a module that defines <perspective-viewer> and exports `ready`. When the websocket
// drops (a server restart, a network change) the page says so, reconnects with backoff and
// puts each viewer back as it was: the server forgets every view, so the page keeps each
// viewer's configuration and restores it on a new client.

// Wait before the first reconnection attempt; doubled on each failure up to MAX_DELAY_MS.
const FIRST_DELAY_MS = 1000;
const MAX_DELAY_MS = 16000;

// A table as it comes: ungrouped, unsorted, unfiltered, no computed columns.
const AS_IS = {
    group_by: [], split_by: [], sort: [], filter: [], expressions: {}, aggregates: {},
    columns_config: {},
};
// A legend beside the bars rather than over them, wide enough for "Office Supplies".
const LEGEND = { legend_mode: "sidebar", legend_size_mode: "fixed", legend_width_px: 150 };
// The chart panel's default: the orders' total summed by region, a bar per category.
// "Y Bar" is the plugin CHART_ELEMENT of perspective-python 5.x's bundle (it draws with WebGL).
const CHART_ELEMENT = "perspective-viewer-charts-y-bar";
const ORDERS_CHART = {
    ...AS_IS, settings: false, plugin: "Y Bar", plugin_config: LEGEND, table: "orders",
    title: "orders: total by region and category", columns: ["total"], group_by: ["region"],
    split_by: ["category"], aggregates: { total: "sum" },
};

const status = document.getElementById("status");
const picker = document.getElementById("table");
const resetButton = document.getElementById("reset");
const url = new URL(document.body.dataset.websocket, location.href);
url.protocol = location.protocol === "https:" ? "wss:" : "ws:";

// True while the viewers show a connected client's tables, so their changes are worth saving.
let live = false;
// The client of the latest connection and the tables it hosts, for the picker and the reset.
let current = null;
let hosted = [];
// Ends the wait before the next reconnection attempt, when there is one.
let wake = () => {};

function reconnectNow() {
    wake();
}

function show(state, text, detail = "") {
    status.dataset.state = state;
    status.textContent = text;
    status.title = detail;
}

// Every column of a table, as it comes, in whichever plugin is shown.
async function tableConfig(client, name) {
    // Spelt out rather than viewer.reset(), which needs the server of the view it replaces.
    const columns = await (await client.open_table(name)).columns();
    return { ...AS_IS, table: name, title: name, columns };
}

// One <section> of the page and its viewer, which shows `defaultTable(names)` (null for none)
// as `defaults` configures it, unless it has a configuration of its own to put back. An
// optional panel is hidden while it has no default table; `onSave` hears of each
// configuration it keeps.
class Panel {
    constructor(section, { defaultTable, defaults, optional = false, onSave = () => {} }) {
        this.section = section;
        this.viewer = section.querySelector("perspective-viewer");
        this.defaultTable = defaultTable;
        this.defaults = defaults;
        this.optional = optional;
        this.onSave = onSave;
        // The configuration as last saved while connected; null until a table is shown.
        this.saved = null;
        this.updates = 0;
        this.viewer.addEventListener("perspective-config-update", () => this.remember());
    }

    // Points the viewer at a freshly connected client, as it was before the last disconnect.
    async attach(client, names) {
        const table = this.defaultTable(names);
        if (this.optional) this.section.hidden = table === null;
        if (this.section.hidden) return;
        // Released when the socket closed too, but a chart drawn since holds the closed client.
        await this.releaseCharts();
        await this.viewer.load(client);
        if (this.saved !== null && names.includes(this.saved.table)) {
            try {
                await this.viewer.restore(this.saved);
            } catch (error) {
                // The server may have come back with another schema: start that table afresh.
                console.warn("could not restore the viewer's configuration", this.saved, error);
                const afresh = this.saved.table === table
                    ? this.defaults(client, table) : tableConfig(client, this.saved.table);
                await this.viewer.restore(await afresh);
            }
        } else if (table !== null) {
            await this.viewer.restore(await this.defaults(client, table));
        }
        this.saved = await this.viewer.save();
    }

    // perspective-viewer-charts (5.x) keeps the client it first drew from, through a proxy
    // session of its own: on a new client it would still query the closed one and never draw,
    // and the closed one rejects its requests where nothing catches them. Deleting a chart
    // plugin's renderer closes that session; the plugin builds another when it next draws.
    async releaseCharts() {
        for (const plugin of await this.viewer.getAllPlugins()) {
            if (plugin.tagName.startsWith("PERSPECTIVE-VIEWER-CHARTS-")) plugin.delete();
        }
    }

    // Shows the default table as configured by default.
    async reset(client, names) {
        const table = this.defaultTable(names);
        if (!this.section.hidden && table !== null) {
            await this.viewer.restore(await this.defaults(client, table));
        }
    }

    async remember() {
        if (!live) return;
        const update = ++this.updates;
        const config = await this.viewer.save();
        // Keep only the latest, and nothing saved after a disconnect: by then the viewer may
        // have lost its table.
        if (live && update === this.updates) {
            this.saved = config;
            this.onSave(config);
        }
    }
}

// The panel whose table the picker chooses: the live table when the server has it.
const tablePanel = new Panel(document.getElementById("table-panel"), {
    defaultTable: (names) => (names.includes("prices") ? "prices" : names[0] ?? null),
    defaults: async (client, name) => ({
        ...(await tableConfig(client, name)), settings: false, plugin: "Datagrid",
        plugin_config: {},
    }),
    onSave: (config) => { picker.value = config.table ?? ""; },
});
// Shown when the server has "orders" and the viewer bundle has the chart plugin: one given
// by PERSPECTIVE_ASGI_ASSET_URL may not.
const chartPanel = new Panel(document.getElementById("chart-panel"), {
    defaultTable: (names) => (names.includes(ORDERS_CHART.table) &&
        customElements.get(CHART_ELEMENT) !== undefined ? ORDERS_CHART.table : null),
    defaults: async () => ORDERS_CHART,
    optional: true,
});
const panels = [tablePanel, chartPanel];

// A Perspective client on a new websocket. `opened` resolves once the socket is open;
// `closed` resolves with a description when it closes, whether or not it ever opened.
function connect(Client) {
    const ws = new WebSocket(url);
    ws.binaryType = "arraybuffer";
    const client = new Client(
        async (request) => {
            // A request made after the socket closed must fail, not wait for a reply forever.
            if (ws.readyState !== WebSocket.OPEN) throw new Error("disconnected");
            // The client lends a view of WebAssembly memory: copy it before the next request.
            ws.send(request.slice());
        },
        async () => ws.close(),
    );
    ws.onmessage = (event) => client.handle_response(new Uint8Array(event.data));
    const opened = new Promise((resolve) => ws.addEventListener("open", resolve, { once: true }));
    const closed = new Promise((resolve) => {
        ws.onclose = (event) => {
            const why = event.reason ? `: ${event.reason}` : "";
            const reason = `websocket closed (${event.code}${why})`;
            // Rejects the requests still waiting for a reply, and tells the viewers, which
            // offer to reconnect at once; the charts let go of the client first.
            Promise.all(panels.map((panel) => panel.releaseCharts()))
                .then(() => client.handle_error(reason, reconnectNow))
                .catch(() => {});
            resolve(reason);
        };
    });
    return { client, opened, closed, close: () => ws.close() };
}

// Points every panel at a freshly connected client.
async function attach(client) {
    current = client;
    hosted = (await client.get_hosted_table_names()).sort();
    picker.replaceChildren(...hosted.map((name) => new Option(name, name)));
    picker.disabled = hosted.length === 0;
    // The panels load side by side: one client, its requests answered in turn.
    await Promise.all(panels.map((panel) => panel.attach(client, hosted)));
    picker.value = tablePanel.saved?.table ?? "";
    live = true;
    resetButton.disabled = false;
}

// Counts down `ms` on the status line, a second at a time, unless woken sooner.
async function countdown(ms, reason) {
    let woken = false;
    wake = () => { woken = true; };
    const until = Date.now() + ms;
    for (let left = ms; left > 0 && !woken; left = until - Date.now()) {
        show("closed", `disconnected — reconnecting in ${Math.ceil(left / 1000)}s`, reason);
        await new Promise((resolve) => {
            wake = () => { woken = true; resolve(); };
            setTimeout(resolve, left % 1000 || 1000);
        });
    }
    wake = () => {};
}

async function run(Client) {
    let failures = 0;
    for (;;) {
        const first = panels.every((panel) => panel.saved === null);
        show("connecting", first ? "connecting…" : "reconnecting…");
        const { client, opened, closed, close } = connect(Client);
        let reason = await Promise.race([opened.then(() => null), closed]);
        if (reason === null) {
            try {
                // A disconnect while attaching ends the attempt; attaching may never finish.
                const dropped = closed.then((why) => Promise.reject(new Error(why)));
                await Promise.race([attach(client), dropped]);
                show("open", "connected", url.href);
                failures = 0;
                reason = await closed;
            } catch (error) {
                console.warn("reconnecting after", error);
                reason = error.message ?? String(error);
                close();
            }
        }
        live = false;
        resetButton.disabled = true;
        await countdown(Math.min(MAX_DELAY_MS, FIRST_DELAY_MS * 2 ** failures), reason);
        failures += 1;
    }
}

// The network came back: no need to wait out the backoff.
window.addEventListener("online", reconnectNow);

picker.addEventListener("change", async () => {
    try {
        await tablePanel.viewer.restore(await tableConfig(current, picker.value));
    } catch (error) {
        console.warn("could not show", picker.value, error);
    }
});

resetButton.addEventListener("click", async () => {
    try {
        await Promise.all(panels.map((panel) => panel.reset(current, hosted)));
    } catch (error) {
        console.warn("could not reset the layout", error);
    }
});

try {
    // `ready` settles once the bundle's WebAssembly is compiled.
    const { ready } = await import(document.body.dataset.bundle);
    await ready;
    await run(customElements.get("perspective-viewer").__wasm_module__.Client);
} catch (error) {
    console.error(error);
    show("closed", `error: ${error.message ?? error}`);
}
