// The demo dashboard: a <perspective-viewer> on the server's Perspective websocket.
//
// <body> names what to load: data-websocket is the websocket's path, data-bundle the viewer
// bundle, a module that defines <perspective-viewer> and exports `ready`. When the websocket
// drops (a server restart, a network change) the page says so, reconnects with backoff and
// puts the viewer back as it was: the server forgets every view, so the page keeps the
// viewer's configuration and restores it on a new client.

// Wait before the first reconnection attempt; doubled on each failure up to MAX_DELAY_MS.
const FIRST_DELAY_MS = 1000;
const MAX_DELAY_MS = 16000;

const status = document.getElementById("status");
const picker = document.getElementById("table");
const viewer = document.querySelector("perspective-viewer");
const url = new URL(document.body.dataset.websocket, location.href);
url.protocol = location.protocol === "https:" ? "wss:" : "ws:";

// The viewer's configuration as last saved while connected; null until a table is shown.
let saved = null;
// True while the viewer shows a connected client's table, so its changes are worth saving.
let live = false;
// The client of the latest connection, for the table picker.
let current = null;
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
            // Rejects the requests still waiting for a reply, and tells the viewer, which offers
            // to reconnect at once.
            client.handle_error(reason, reconnectNow).catch(() => {});
            resolve(reason);
        };
    });
    return { client, opened, closed, close: () => ws.close() };
}

// Shows every column of a table, ungrouped, unsorted and unfiltered.
async function showTable(client, name) {
    // Spelt out rather than viewer.reset(), which needs the server of the view it replaces.
    const columns = await (await client.open_table(name)).columns();
    await viewer.restore({
        table: name, title: name, columns, group_by: [], split_by: [], sort: [], filter: [],
        expressions: {}, aggregates: {}, columns_config: {},
    });
}

// Points the viewer at a freshly connected client, as it was before the last disconnect.
async function attach(client) {
    current = client;
    const names = (await client.get_hosted_table_names()).sort();
    picker.replaceChildren(...names.map((name) => new Option(name, name)));
    picker.disabled = names.length === 0;
    await viewer.load(client);
    if (saved !== null && names.includes(saved.table)) {
        try {
            await viewer.restore(saved);
        } catch (error) {
            // The server may have come back with another schema: start that table afresh.
            console.warn("could not restore the viewer's configuration", saved, error);
            await showTable(client, saved.table);
        }
    } else if (names.length > 0) {
        await showTable(client, names.includes("prices") ? "prices" : names[0]);
    }
    saved = await viewer.save();
    picker.value = saved.table ?? "";
    live = true;
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
        show("connecting", saved === null ? "connecting…" : "reconnecting…");
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
        await countdown(Math.min(MAX_DELAY_MS, FIRST_DELAY_MS * 2 ** failures), reason);
        failures += 1;
    }
}

let updates = 0;
viewer.addEventListener("perspective-config-update", async () => {
    if (!live) return;
    const update = ++updates;
    const config = await viewer.save();
    // Keep only the latest, and nothing saved after a disconnect: by then the viewer may have
    // lost its table.
    if (live && update === updates) {
        saved = config;
        picker.value = config.table ?? "";
    }
});

// The network came back: no need to wait out the backoff.
window.addEventListener("online", reconnectNow);

picker.addEventListener("change", () => {
    showTable(current, picker.value).catch(
        (error) => console.warn("could not show", picker.value, error),
    );
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
