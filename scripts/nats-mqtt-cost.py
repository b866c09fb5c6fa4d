#!/usr/bin/env python3
"""What a 3-node NATS cluster (nats-server with JetStream and MQTT, as DEPLOY.md sets it
up) spends on N MQTT devices: CPU of the three nodes while the devices connect and
subscribe to their `cmd` topic, while they sit idle, and per 1,000 QoS 1 messages they
publish that a JetStream consumer pulls and acknowledges as the control plane's ingest
does (docs/BENCHMARKS.md, "Commands at QoS 0").

Usage (as root, with nats-server on PATH, in a venv holding paho-mqtt 1.x and nats-py):
    scripts/nats-mqtt-cost.py [--devices 1000] [--messages 30] [--idle 30]
                              [--command-qos 0|1] [--ingest stream|mqtt-msgs]

--ingest stream: the messages are captured by a work-queue stream FLEETML_INGEST (what
`fleetctl serve --ingest-queue` makes); mqtt-msgs: a durable consumer on nats-server's
own `$MQTT_msgs` stream instead (the alternative measured and not taken).
Publishers run in processes of 250 devices each (paho-mqtt's select() loop handles no
file descriptor above 1,023). Prints one line per measure.
"""
import argparse, asyncio, os, shutil, socket, subprocess, sys, threading, time

CHUNK = 250


def publisher(lo, hi, per, ports, qos, workdir):
    import paho.mqtt.client as mqtt
    acked, subs, lock = [0], [0], threading.Lock()

    def onpub(c, u, mid):
        with lock:
            acked[0] += 1

    def onsub(c, u, mid, granted):
        with lock:
            subs[0] += 1

    clients = []
    for i in range(lo, hi):
        c = mqtt.Client(client_id=f"dev{i}", clean_session=False)
        c.max_inflight_messages_set(20)
        c.on_publish, c.on_subscribe = onpub, onsub
        c.on_connect = lambda cl, u, f, rc, i=i: cl.subscribe(f"fleetml/v1/dev{i}/cmd", qos=qos)
        c.connect("127.0.0.1", ports[i % len(ports)], 120)
        c.loop_start()
        clients.append(c)
    while subs[0] < len(clients):
        time.sleep(0.2)
    open(f"{workdir}/ready{lo}", "w").close()
    while not os.path.exists(f"{workdir}/go"):
        time.sleep(0.1)
    payload = os.urandom(400)
    for _ in range(per):
        for i, c in zip(range(lo, hi), clients):
            c.publish(f"fleetml/v1/dev{i}/telemetry", payload, qos=1)
        time.sleep(0.01)
    deadline = time.time() + 240
    while acked[0] < per * len(clients) and time.time() < deadline:
        time.sleep(0.2)
    for c in clients:
        c.loop_stop()
        c.disconnect()


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--devices", type=int, default=1000)
    ap.add_argument("--messages", type=int, default=30, help="per device")
    ap.add_argument("--idle", type=int, default=30, help="seconds measured idle")
    ap.add_argument("--command-qos", type=int, default=0, choices=[0, 1])
    ap.add_argument("--ingest", default="stream", choices=["stream", "mqtt-msgs"])
    ap.add_argument("--publisher", nargs=3, type=int, help=argparse.SUPPRESS)
    ap.add_argument("--ports", help=argparse.SUPPRESS)
    ap.add_argument("--workdir", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.publisher:
        lo, hi, per = a.publisher
        ports = [int(p) for p in a.ports.split(",")]
        return publisher(lo, hi, per, ports, a.command_qos, a.workdir)

    import nats
    from nats.js.api import AckPolicy, ConsumerConfig, RetentionPolicy, StorageType, StreamConfig

    workdir = "/tmp/nats-mqtt-cost"
    shutil.rmtree(workdir, ignore_errors=True)
    os.makedirs(workdir)
    nodes = [dict(port=free_port(), mqtt=free_port(), route=free_port()) for _ in range(3)]
    routes = ", ".join(f"nats-route://127.0.0.1:{n['route']}" for n in nodes)
    procs = []
    for i, n in enumerate(nodes):
        with open(f"{workdir}/n{i}.conf", "w") as f:
            f.write(
                f"server_name: n{i}\nlisten: 127.0.0.1:{n['port']}\n"
                f'jetstream {{ store_dir: "{workdir}/js{i}" }}\n'
                f"cluster {{ name: cost, listen: 127.0.0.1:{n['route']}, routes: [{routes}] }}\n"
                f"mqtt {{ listen: 127.0.0.1:{n['mqtt']}, consumer_memory_storage: true }}\n"
            )
        procs.append(subprocess.Popen(["nats-server", "-c", f"{workdir}/n{i}.conf"],
                                      stderr=open(f"{workdir}/n{i}.log", "w")))

    def cpu():
        total = 0
        for p in procs:
            fields = open(f"/proc/{p.pid}/stat").read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
        return total / os.sysconf("SC_CLK_TCK")

    try:
        time.sleep(5)
        c0, t0 = cpu(), time.time()
        ports = ",".join(str(n["mqtt"]) for n in nodes)
        pubs = [subprocess.Popen([sys.executable, os.path.abspath(__file__), "--publisher", str(lo),
                                  str(min(lo + CHUNK, a.devices)), str(a.messages), "--ports", ports,
                                  "--workdir", workdir, "--command-qos", str(a.command_qos)])
                for lo in range(0, a.devices, CHUNK)]
        while sum(os.path.exists(f"{workdir}/ready{lo}") for lo in range(0, a.devices, CHUNK)) < len(pubs):
            if time.time() - t0 > 300:
                sys.exit("the devices did not all connect and subscribe within 300 s")
            time.sleep(0.5)
        print(f"connect+subscribe {a.devices} devices (command QoS {a.command_qos}): "
              f"{time.time() - t0:.1f} s, nodes' CPU {cpu() - c0:.2f} s", flush=True)
        time.sleep(3)
        if a.idle:
            c1 = cpu()
            time.sleep(a.idle)
            print(f"idle {a.idle} s: nodes' CPU {cpu() - c1:.2f} s", flush=True)

        async def ingest():
            nc = await nats.connect(f"nats://127.0.0.1:{nodes[0]['port']}")
            js = nc.jetstream()
            config = ConsumerConfig(ack_policy=AckPolicy.EXPLICIT, max_ack_pending=20000)
            if a.ingest == "stream":
                await js.add_stream(StreamConfig(
                    name="FLEETML_INGEST",
                    subjects=[f"fleetml.v1.*.{c}" for c in ("status", "telemetry", "events")],
                    retention=RetentionPolicy.WORK_QUEUE, storage=StorageType.FILE, num_replicas=3))
                sub = await js.pull_subscribe("", durable="fleetml-ingest", stream="FLEETML_INGEST",
                                              config=config)
            else:
                sub = await js.pull_subscribe("$MQTT.msgs.fleetml.v1.>", durable="fleetml-ingest",
                                              stream="$MQTT_msgs", config=config)
            total = a.devices * a.messages
            c2, t2 = cpu(), time.time()
            open(f"{workdir}/go", "w").close()
            got = 0
            while got < total and time.time() - t2 < 300:
                try:
                    msgs = await sub.fetch(256, timeout=5)
                except Exception:
                    continue
                for m in msgs:
                    got += m.subject.endswith(".telemetry")
                    await m.ack()
            await nc.flush()
            elapsed = time.time() - t2
            await asyncio.sleep(2)
            spent = cpu() - c2
            print(f"ingest ({a.ingest}) {got} of {total} QoS 1 messages in {elapsed:.1f} s: nodes' CPU "
                  f"{spent:.2f} s, {1000 * spent / max(got, 1):.3f} s per 1,000", flush=True)
            await nc.close()

        asyncio.run(ingest())
        for p in pubs:
            p.wait()
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait()


if __name__ == "__main__":
    main()
