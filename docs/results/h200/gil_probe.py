"""Does the host's wait for the GPU release the GIL? A second thread counts while the main
thread waits ~50 ms for a GPU sleep kernel through each kind of wait."""
import threading
import time

import torch

count, stop = [0], [False]


def spin():
    while not stop[0]:
        count[0] += 1


t = threading.Thread(target=spin, daemon=True)
t.start()
x = torch.zeros(4, device="cuda", dtype=torch.long)
for name in ("event.synchronize", "tensor.tolist", "tensor.item", "stream.synchronize", "query+sleep", "busy"):
    for _ in range(2):
        torch.cuda.synchronize()
        torch.cuda._sleep(100_000_000)  # ~50 ms of GPU time
        y = x + 1
        ev = torch.cuda.Event()
        ev.record()
        c0, t0 = count[0], time.perf_counter()
        if name == "event.synchronize":
            ev.synchronize()
        elif name == "tensor.tolist":
            y.tolist()
        elif name == "tensor.item":
            y[0].item()
        elif name == "stream.synchronize":
            torch.cuda.current_stream().synchronize()
        elif name == "query+sleep":
            while not ev.query():
                time.sleep(0.0002)
        else:
            torch.cuda.synchronize()
            c0, t0 = count[0], time.perf_counter()
            end = t0 + 0.05
            while time.perf_counter() < end:
                pass
        dt = time.perf_counter() - t0
    print(f"{name:20s} wait {dt * 1e3:6.1f} ms, other thread counted {(count[0] - c0) / dt / 1e6:6.2f} M/s", flush=True)
stop[0] = True
