// Sets up or resets a user's cross-signing identity with matrix-js-sdk and its Rust crypto,
// the client stack of Element Web, and prints one JSON object describing what happened.
//
//   XSIGN_HOMESERVER_URL=http://127.0.0.1:8008 XSIGN_USER_ID=@alice:localhost \
//   XSIGN_PASSWORD=secret node driver.mjs <scenario>
//
// Scenarios:
//   bootstrap         bootstrapCrossSigning({}) on a fresh device; UIA is not answered
//   reset             bootstrapCrossSigning({ setupNewCrossSigning: true }); a UIA challenge
//                     is answered with the password (m.login.password)
//   reset-no-password bootstrapCrossSigning({ setupNewCrossSigning: true }); UIA is not
//                     answered, so it succeeds only if the server asks for none
//
// Each run logs in with the password, which creates a new device, and keeps its crypto
// store in memory. The SDK's own log goes to stderr; stdout carries only the JSON result.
// Exit status: 0 when the JSON was printed (whether bootstrapping succeeded or not: the
// caller judges), 2 on a usage error or a Node.js too old, 1 when the driver itself failed.

import { readFileSync } from "node:fs";
import process from "node:process";

const MIN_NODE_MAJOR = 20;
const started = performance.now();
const elapsed = () => Math.round(performance.now() - started);

// The pinned SDK declares node >= 20 and needs it (the global Web Crypto API, for one):
// on an older Node.js it would fail somewhere inside, far from the cause.
if (Number(process.versions.node.split(".")[0]) < MIN_NODE_MAJOR) {
    process.stderr.write(`Node.js ${MIN_NODE_MAJOR} or later is needed; this is ${process.version}\n`);
    process.exit(2);
}

// The SDK logs through console.log and console.info, which would mix with the result.
for (const level of ["log", "info", "debug", "trace"]) {
    console[level] = (...args) => console.error(...args);
}

const { createClient, MatrixError } = await import("matrix-js-sdk");

const SCENARIOS = {
    bootstrap: { setupNewCrossSigning: false, answerUia: false },
    reset: { setupNewCrossSigning: true, answerUia: true },
    "reset-no-password": { setupNewCrossSigning: true, answerUia: false },
};
const UPLOAD_PATH = "/_matrix/client/v3/keys/device_signing/upload";
const KEY_FIELDS = {
    master_key: "master",
    self_signing_key: "self_signing",
    user_signing_key: "user_signing",
};

function usage(message) {
    const scenarios = Object.keys(SCENARIOS).join("|");
    process.stderr.write(`${message}\nusage: node driver.mjs <${scenarios}>\n`);
    process.exit(2);
}

// The crypto package does not export its package.json, so read what npm installed.
function packageVersion(name) {
    const path = new URL(`./node_modules/${name}/package.json`, import.meta.url);
    return JSON.parse(readFileSync(path, "utf8")).version;
}

// The password never leaves the driver in its output.
function redactAuth(auth) {
    if (auth === null || auth === undefined) return null;
    const shown = { ...auth };
    if ("password" in shown) shown.password = "<redacted>";
    return shown;
}

function publicKeys(body) {
    const keys = {};
    for (const [field, name] of Object.entries(KEY_FIELDS)) {
        const key = body?.[field];
        if (key?.keys) keys[name] = Object.values(key.keys)[0];
    }
    return keys;
}

function describeError(error) {
    if (error instanceof MatrixError) {
        return {
            http_status: error.httpStatus ?? null,
            errcode: error.errcode ?? null,
            message: error.message,
            flows: error.data?.flows ?? null,
            session: error.data?.session ?? null,
            completed: error.data?.completed ?? null,
        };
    }
    return { http_status: null, errcode: null, message: String(error?.stack ?? error) };
}

// Every HTTP exchange the SDK makes, and the full detail of the cross-signing uploads.
function recordingFetch(http) {
    return async (input, init = {}) => {
        const url = new URL(typeof input === "string" || input instanceof URL ? input : input.url);
        const method = (init.method ?? "GET").toUpperCase();
        const response = await fetch(input, init);
        const entry = { method, path: url.pathname, status: response.status, at_ms: elapsed() };
        if (url.pathname === UPLOAD_PATH) {
            const sent = typeof init.body === "string" ? JSON.parse(init.body) : null;
            let received = null;
            try {
                received = await response.clone().json();
            } catch {
                received = null;
            }
            entry.sent = { keys: publicKeys(sent), auth: redactAuth(sent?.auth) };
            entry.received = received;
        }
        http.push(entry);
        return response;
    };
}

async function main() {
    const scenarioName = process.argv[2];
    const scenario = SCENARIOS[scenarioName];
    if (!scenario) usage(`unknown scenario: ${scenarioName ?? "(none)"}`);
    const baseUrl = process.env.XSIGN_HOMESERVER_URL;
    const userId = process.env.XSIGN_USER_ID;
    const password = process.env.XSIGN_PASSWORD;
    if (!baseUrl || !userId || !password) {
        usage("XSIGN_HOMESERVER_URL, XSIGN_USER_ID and XSIGN_PASSWORD must be set");
    }

    const http = [];
    const fetchFn = recordingFetch(http);
    const result = {
        scenario: scenarioName,
        node: process.version,
        sdk: {
            "matrix-js-sdk": packageVersion("matrix-js-sdk"),
            "@matrix-org/matrix-sdk-crypto-wasm": packageVersion("@matrix-org/matrix-sdk-crypto-wasm"),
        },
        user_id: userId,
        callback_calls: 0,
        attempts: [],
        http,
    };

    const login = await createClient({ baseUrl, fetchFn }).loginRequest({
        type: "m.login.password",
        identifier: { type: "m.id.user", user: userId },
        password,
        initial_device_display_name: `xsign real client (${scenarioName})`,
    });
    result.device_id = login.device_id;

    const client = createClient({
        baseUrl,
        fetchFn,
        userId: login.user_id,
        deviceId: login.device_id,
        accessToken: login.access_token,
    });
    await client.initRustCrypto({ useIndexedDB: false });
    const crypto = client.getCrypto();
    result.sdk.crypto = crypto.getVersion();

    // What a real app's UIA callback does: try without auth first, since the server may
    // not need any, and prompt for the password only when challenged.
    const authUploadDeviceSigningKeys = async (makeRequest) => {
        result.callback_calls += 1;
        try {
            const response = await makeRequest(null);
            result.attempts.push({ auth: null, outcome: "ok", response });
            return response;
        } catch (error) {
            result.attempts.push({ auth: null, outcome: "error", error: describeError(error) });
            if (!scenario.answerUia || !(error instanceof MatrixError) || error.httpStatus !== 401) {
                throw error;
            }
            const auth = {
                type: "m.login.password",
                identifier: { type: "m.id.user", user: userId },
                password,
                session: error.data?.session,
            };
            try {
                const response = await makeRequest(auth);
                result.attempts.push({ auth: redactAuth(auth), outcome: "ok", response });
                return response;
            } catch (retryError) {
                result.attempts.push({
                    auth: redactAuth(auth),
                    outcome: "error",
                    error: describeError(retryError),
                });
                throw retryError;
            }
        }
    };

    try {
        await crypto.bootstrapCrossSigning({
            setupNewCrossSigning: scenario.setupNewCrossSigning,
            authUploadDeviceSigningKeys,
        });
        result.bootstrap = { ok: true, at_ms: elapsed() };
    } catch (error) {
        result.bootstrap = { ok: false, error: describeError(error) };
    }

    // Only now start syncing, which is when the Rust crypto sends the /keys/query it queued
    // for our own user at log-in. Sent during the bootstrap, it could be answered with the
    // identity being replaced, and the crypto would then drop its new private keys.
    const synced = new Promise((resolve, reject) => {
        client.on("sync", (state, _previous, data) => {
            if (state === "PREPARED") resolve();
            if (state === "ERROR") reject(data?.error ?? new Error("sync failed"));
        });
    });
    await client.startClient({ initialSyncLimit: 1 });
    await synced;

    // What the SDK believes afterwards: its own private keys, and the server's public ones.
    const serverHasKeys = await crypto.userHasCrossSigningKeys(login.user_id, true);
    const status = await crypto.getCrossSigningStatus();
    const deviceStatus = await crypto.getDeviceVerificationStatus(login.user_id, login.device_id);
    result.cross_signing = {
        local_master_key: await crypto.getCrossSigningKeyId(),
        private_keys_cached: status.privateKeysCachedLocally,
        public_keys_on_device: status.publicKeysOnDevice,
        server_has_keys: serverHasKeys,
        ready: await crypto.isCrossSigningReady(),
        device_cross_signed: deviceStatus?.crossSigningVerified ?? false,
    };
    result.done_at_ms = elapsed();

    client.stopClient();
    process.stdout.write(`${JSON.stringify(result)}\n`);
}

try {
    await main();
    process.exit(0);
} catch (error) {
    process.stderr.write(`driver failed: ${error?.stack ?? error}\n`);
    process.exit(1);
}
