// What the node scenarios share: loading the stock client of one flavour, and bounded waits.

import { createRequire } from "node:module";
import path from "node:path";
import { pathToFileURL } from "node:url";

// Resolve and import a package as seen from the flavour folder (tests/js/v4 or v5).
export async function loadFrom(flavourDir, spec) {
    const require = createRequire(path.join(flavourDir, "package.json"));
    let resolved;
    try {
        resolved = require.resolve(spec);
    } catch (e) {
        throw new Error(`cannot resolve ${spec} from ${flavourDir} (run tests/js/install.sh): ${e.message}`);
    }
    return import(pathToFileURL(resolved).href);
}

// `promise`, or a rejection naming `what` once `ms` milliseconds have passed.
export function withTimeout(promise, ms, what) {
    let timer;
    const timeout = new Promise((_, reject) => {
        timer = setTimeout(() => reject(new Error(`timed out after ${ms} ms: ${what}`)), ms);
    });
    return Promise.race([promise, timeout]).finally(() => clearTimeout(timer));
}
