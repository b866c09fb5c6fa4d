"""Checks captured fleetml MQTT messages against docs/PROTOCOL.md from outside the code.

Decodes each message with the generic `cbor2` library, verifies its MAC with Python's
`hmac` over the bytes as sent, keyed as PROTOCOL.md says (the device secret's 64 hex
digits decoded to 32 bytes), and compares every body's keys with the page's table of
body keys. Also derives the device's MQTT password and HTTP token as the page says and
checks the password against the control plane's mosquitto password file (`$7$`,
PBKDF2-HMAC-SHA512).

Usage: python wire_check.py CAPTURE.json PROTOCOL.md
CAPTURE.json: {"device", "secret" (hex), "board", "passwd" (file text),
               "messages": [{"topic", "payload" (hex)}]}
Prints a JSON summary (kinds seen, the derived HTTP token); exits 1 naming the first
message that disagrees with the page.
"""

import base64
import hashlib
import hmac
import json
import re
import sys

import cbor2

CHANNEL_OF = {
    "status": "status",
    "window": "telemetry",
    "alert": "telemetry",
    "event": "events",
    "ack": "events",
    "command": "cmd",
    "receipt": "cmd",
}


def fail(message):
    print(f"wire check: {message}", file=sys.stderr)
    sys.exit(1)


def body_tables(page):
    """`path -> (required, optional)` from the table under `| body | keys |`."""
    start = page.index("| body | keys |")
    tables = {}
    for line in page[start:].splitlines()[2:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        path = cells[0].strip("`")
        keys = re.findall(r"`([a-z0-9_]+\??)`", cells[1])
        required = {k for k in keys if not k.endswith("?")}
        optional = {k[:-1] for k in keys if k.endswith("?")}
        tables[path] = (required, optional)
    return tables


def check_keys(where, value, tables, path):
    if path not in tables:
        return
    required, optional = tables[path]
    items = value if path.endswith("[]") else [value]
    for item in items:
        if item is None:
            continue
        if not isinstance(item, dict):
            fail(f"{where}: `{path}` is not a map: {item!r}")
        have = set(item)
        if not required <= have:
            fail(f"{where}: `{path}` lacks {sorted(required - have)} (PROTOCOL.md lists them)")
        if not have <= required | optional:
            fail(f"{where}: `{path}` has {sorted(have - required - optional)}, which PROTOCOL.md does not list")
        for key, sub in item.items():
            for child in (f"{path}.{key}", f"{path}.{key}[]"):
                if child in tables:
                    check_keys(where, sub, tables, child)


def main():
    capture = json.load(open(sys.argv[1]))
    page = open(sys.argv[2]).read()
    tables = body_tables(page)
    key = bytes.fromhex(capture["secret"])
    if len(key) != 32:
        fail(f"the secret is {len(key)} bytes, PROTOCOL.md says 32")
    device = capture["device"]
    seen = {}
    for i, m in enumerate(capture["messages"]):
        where = f"message {i} on {m['topic']}"
        payload = bytes.fromhex(m["payload"])
        outer = cbor2.loads(payload)
        if not isinstance(outer, dict) or set(outer) != {"v", "msg", "auth"}:
            fail(f"{where}: the envelope is not the map {{v, msg, auth}}: {outer!r:.200}")
        if outer["v"] != 2:
            fail(f"{where}: format {outer['v']}, PROTOCOL.md says 2")
        expected = hmac.new(key, outer["msg"], hashlib.sha256).digest()
        if not hmac.compare_digest(expected, outer["auth"]):
            fail(f"{where}: auth is not HMAC-SHA256(secret bytes, msg bytes)")
        inner = cbor2.loads(outer["msg"])
        if set(inner) != {"v", "device", "seq", "ts_ms", "body"}:
            fail(f"{where}: msg keys {sorted(inner)}")
        if inner["v"] != 2 or inner["device"] != device:
            fail(f"{where}: msg says v {inner['v']}, device {inner['device']}")
        _, _, topic_device, channel = m["topic"].split("/")
        if topic_device != device:
            fail(f"{where}: topic of another device")
        body = inner["body"]
        if not isinstance(body, dict) or len(body) != 1:
            fail(f"{where}: body is not a map of one key: {body!r:.200}")
        (kind, value), = body.items()
        if CHANNEL_OF.get(kind) != channel:
            fail(f"{where}: a `{kind}` body on the `{channel}` topic")
        check_keys(where, value, tables, kind)
        if kind == "status" and value["board"] != capture["board"]:
            fail(f"{where}: status names board `{value['board']}`, the device was enrolled as `{capture['board']}`")
        seen[kind] = seen.get(kind, 0) + 1

    password = hmac.new(key, b"fleetml/v1 mqtt password", hashlib.sha256).hexdigest()
    line = next((l for l in capture["passwd"].splitlines() if l.startswith(device + ":")), None)
    if line is None:
        fail(f"no line for {device} in the mosquitto password file")
    _, _, rounds, salt, digest = line.split(":", 1)[1].split("$")
    derived = hashlib.pbkdf2_hmac("sha512", password.encode(), base64.b64decode(salt), int(rounds))
    if not hmac.compare_digest(derived, base64.b64decode(digest)):
        fail("the MQTT password derived as PROTOCOL.md says does not match the password file")
    token = "device:{}:{}".format(device, hmac.new(key, b"fleetml/v1 http", hashlib.sha256).hexdigest())
    print(json.dumps({"kinds": seen, "http_token": token}))


if __name__ == "__main__":
    main()
