# Ping-pong latency between two processes over a Unix socket: the floor under any
# request/response on this machine (both sides sleep in the kernel between messages).
import os, socket, statistics, sys, time
path = "/tmp/pingpong.sock"
if os.path.exists(path): os.remove(path)
srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM); srv.bind(path); srv.listen(1)
if os.fork() == 0:
    c, _ = srv.accept()
    while True:
        d = c.recv(4096)
        if not d: os._exit(0)
        c.sendall(d)
cl = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM); cl.connect(path)
lat = []
msg = b"x" * 600
for i in range(20000):
    t = time.perf_counter_ns(); cl.sendall(msg); n = 0
    while n < len(msg): n += len(cl.recv(4096))
    lat.append((time.perf_counter_ns() - t) / 1000)
lat = lat[2000:]; lat.sort()
print(f"unix ping-pong 600 B: p50 {lat[len(lat)//2]:.1f} us, p99 {lat[int(len(lat)*0.99)]:.1f} us")
