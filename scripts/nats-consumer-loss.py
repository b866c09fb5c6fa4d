#!/usr/bin/env python3
"""Do devices keep receiving QoS 1 commands when one node of a 3-node NATS cluster dies?

docs/DEPLOY.md ("Scaled with a clustered broker: NATS") cites this measurement. It
starts three private nats-server nodes on loopback (MQTT on each) with EXTRA added to
every node's `mqtt { }` block, connects NDEV devices (clean_session = false, QoS 1
subscription to their own `cmd` topic) to node 0, sends each a command, kills node 2,
sends again, moves every device to node 1 (as devices do when their node dies), and
sends twice more. It prints where the session consumers' leaders were and how many
devices received each command, 5 s after it was sent and at the end. Needs
nats-server (Debian's, 2.9) and paho-mqtt 1.x:

    python3 -m venv /tmp/v && /tmp/v/bin/pip install 'paho-mqtt<2'
    /tmp/v/bin/python scripts/nats-consumer-loss.py 'consumer_memory_storage: true'
    /tmp/v/bin/python scripts/nats-consumer-loss.py 'consumer_replicas: 1, consumer_memory_storage: true'
"""
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

import paho.mqtt.client as mqtt

EXTRA = sys.argv[1] if len(sys.argv) > 1 else ""
NDEV = int(os.environ.get("NDEV", "30"))


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def main():
    work = tempfile.mkdtemp(prefix="nats-consumer-loss-")
    nodes = [dict(port=free_port(), mqtt=free_port(), route=free_port(), http=free_port()) for _ in range(3)]
    routes = ", ".join(f"nats-route://127.0.0.1:{n['route']}" for n in nodes)
    procs = []
    try:
        for i, n in enumerate(nodes):
            conf = (
                f"server_name: n{i}\nlisten: 127.0.0.1:{n['port']}\nhttp: 127.0.0.1:{n['http']}\n"
                f'jetstream {{ store_dir: "{work}/js{i}" }}\n'
                f"cluster {{ name: t, listen: 127.0.0.1:{n['route']}, routes: [{routes}] }}\n"
                f"mqtt {{\n listen: 127.0.0.1:{n['mqtt']}\n {EXTRA}\n}}\n"
            )
            with open(f"{work}/n{i}.conf", "w") as f:
                f.write(conf)
            procs.append(subprocess.Popen(["nats-server", "-c", f"{work}/n{i}.conf"],
                                          stderr=open(f"{work}/n{i}.log", "w")))
        time.sleep(4)
        got = {}

        def device(i, node):
            c = mqtt.Client(client_id=f"d{i}", clean_session=False)

            def on_connect(client, _u, _f, rc):
                client.subscribe(f"fleetml/v1/d{i}/cmd", qos=1)

            c.on_connect = on_connect
            c.on_message = lambda _c, _u, m: got.setdefault(i, set()).add(m.payload)
            c.connect("127.0.0.1", nodes[node]["mqtt"], 30)
            c.loop_start()
            return c

        def leaders():
            where = {}
            for n in nodes:
                try:
                    url = f"http://127.0.0.1:{n['http']}/jsz?consumers=true&accounts=true"
                    j = json.load(urllib.request.urlopen(url, timeout=5))
                except OSError:
                    continue
                for a in j.get("account_details", []):
                    for s in a.get("stream_detail", []):
                        if s["name"] == "$MQTT_msgs":
                            for c in s.get("consumer_detail") or []:
                                where[c["name"]] = c.get("cluster", {}).get("leader", "?")
            return {k: list(where.values()).count(k) for k in sorted(set(where.values()))}

        operator = mqtt.Client(client_id="operator", clean_session=True)
        operator.connect("127.0.0.1", nodes[0]["mqtt"])
        operator.loop_start()

        def send(tag):
            for i in range(NDEV):
                operator.publish(f"fleetml/v1/d{i}/cmd", tag, qos=1)
            time.sleep(5)
            n = sum(1 for i in range(NDEV) if tag.encode() in got.get(i, set()))
            print(f"{tag}: {n} of {NDEV} devices received it")

        print(f"mqtt {{ {EXTRA} }}")
        devices = [device(i, 0) for i in range(NDEV)]
        time.sleep(5)
        print("session consumers' leaders:", leaders())
        send("before")
        procs[2].kill()
        procs[2].wait()
        print("killed n2")
        time.sleep(3)
        send("after-n2-died")
        for c in devices:
            c.disconnect()
            c.loop_stop()
        devices = [device(i, 1) for i in range(NDEV)]
        time.sleep(8)
        print("moved every device to n1")
        send("on-n1")
        time.sleep(10)
        send("on-n1-15s-later")
        for tag in ["before", "after-n2-died", "on-n1", "on-n1-15s-later"]:
            n = sum(1 for i in range(NDEV) if tag.encode() in got.get(i, set()))
            print(f"in the end, {tag}: {n} of {NDEV}")
    finally:
        for p in procs:
            p.kill()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
