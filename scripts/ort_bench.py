"""Latency and throughput of onnxruntime (the peer) on the benchmark models.

usage: ort_bench.py MODEL.onnx claims|cls|det|rec THREADS CLIENTS SECONDS
Prints: `ort-<threads>t model clients p50_us p99_us requests_per_second`.
"""
import sys
import threading
import time

import numpy as np
import onnxruntime as ort


def main() -> None:
    path, model, threads, clients, seconds = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5])
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    if model == "claims":
        x = np.zeros((1, 25), dtype=np.float32)
        x[0, :11] = [7875.09, 90, 54, 0, 4, 0, 1, 0, 674.37, 2, 0]
        x[0, 12] = 1.0  # home
        x[0, 15] = 1.0  # agent
        x[0, 20] = 1.0  # east
        x[0, 23] = 1.0  # police report: yes
    else:
        h, w = {"cls": (48, 192), "det": (640, 640), "rec": (48, 320)}[model]
        i = np.arange(3 * h * w)
        x = (((i * 7919) % 2000).astype(np.float32) / 1000.0 - 1.0).reshape(1, 3, h, w)
    latencies = []
    lock = threading.Lock()
    start = time.perf_counter()

    def client() -> None:
        mine = []
        while time.perf_counter() - start < seconds:
            t = time.perf_counter()
            session.run(None, {name: x})
            mine.append(time.perf_counter() - t)
        with lock:
            latencies.extend(mine)

    workers = [threading.Thread(target=client) for _ in range(clients)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    elapsed = time.perf_counter() - start
    latencies.sort()
    pct = lambda p: latencies[min(int(len(latencies) * p), len(latencies) - 1)] * 1e6
    print(f"ort-{threads}t {model} {clients} {pct(0.5):.1f} {pct(0.99):.1f} {len(latencies) / elapsed:.1f}")


if __name__ == "__main__":
    main()
