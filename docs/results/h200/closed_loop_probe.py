"""Engine-level closed loop (no gRPC) on the device: `--concurrency` requests of `--prompt`
random tokens and `--new` new tokens, a new one submitted as each finishes; per-step wall time
by kind (graph replay vs eager step with a prefill), overlapped steps on and off.

    python3 docs/results/h200/closed_loop_probe.py --layers 32 --steps 600 [--profile-eager]
        [--batched-tokens 512,128] [--sdpa quiver,all] [--split on,off] [--m-bucket 64,1] [--mixed on,off]
        [--set mixed_graphs.PAGED_MAX_KEYS=65536,0,65536,0] [--set engine.OVERLAP_MIXED=1,0,1,0]

Runs: overlap on (cold), off, on (warm) at the first --batched-tokens value (the step's token
budget, max_num_batched_tokens) and --sdpa value, then overlap on at each further value of
either, then at the first values again. --sdpa: the eager path's attention backends, `quiver`
(server/model.SDPA_BACKENDS) or `all` (torch's own choice, cuDNN included); --split: an eager
step's decode rows through the paged decode kernel (ModelRunner.split_decodes) or in the SDPA call;
--m-bucket: the prefill path's row padding (kernels/nf4_words.PREFILL_M_BUCKET; 1 = none);
--mixed: steps with a prefill chunk through the mixed-step graphs (EngineConfig.mixed_graphs) or op by op.
--set: instead of the runs above, one run (overlap on) at each value of an integer constant of
kernels/nf4_words (NARROW_MAX_M: the word kernel's row limit for outputs narrower than WIDE_N)
or server/engine/mixed_graphs (PAGED_MAX_KEYS: 0 turns paged mixed steps off; it exists with
docs/results/h200/paged_mixed_steps_r14.patch applied, measured in round 14 and not kept)
or server/engine/engine (OVERLAP_MIXED: 1 launches a step that the mixed-step graphs take before
the step before's tokens come to the host; on by default since round 15). Repeated, run i sets the i-th value of every --set.

--profile-eager: after the second default run (with --set: after each of the last two runs), one more step (a new prompt beside the running decodes)
under torch.profiler: its host time and the kernels' time, by op.
"""
import argparse
import collections
import json
import time

import torch
from torch.nn.attention import SDPBackend

import quiver.kernels.nf4_words as nf4_words
import quiver.server.engine.engine as engine_mod
import quiver.server.engine.mixed_graphs as mixed_graphs
import quiver.server.model as model_mod

from quiver.loadtest.bench_engine import random_llama
from quiver.server.config import EngineConfig, SamplingParams
from quiver.server.engine.engine import Engine

ap = argparse.ArgumentParser()
ap.add_argument("--layers", type=int, default=32)
ap.add_argument("--steps", type=int, default=600)
ap.add_argument("--concurrency", type=int, default=32)
ap.add_argument("--prompt", type=int, default=128)
ap.add_argument("--new", type=int, default=128)
ap.add_argument("--profile-eager", action="store_true")
ap.add_argument("--device", default="cuda")
ap.add_argument("--batched-tokens", default="512", help="comma list of max_num_batched_tokens")
ap.add_argument("--sdpa", default="quiver", help="comma list of quiver | all")
ap.add_argument("--split", default="on", help="comma list of on | off: an eager step's decodes through the decode kernel")
ap.add_argument("--m-bucket", default=str(nf4_words.PREFILL_M_BUCKET), help="comma list: prefill path row padding")
ap.add_argument("--mixed", default="on", help="comma list of on | off: mixed-step graphs")
ap.add_argument("--set", action="append", metavar="MODULE.NAME=V1,V2,...",
                help="a module constant (nf4_words.NARROW_MAX_M, mixed_graphs.PAGED_MAX_KEYS, engine.OVERLAP_MIXED), "
                     "one run with overlap on at each value, instead of the runs above; repeated: the i-th values "
                     "of every --set in run i")
args = ap.parse_args()
device = torch.device(args.device)
loaded = random_llama(args.layers, "nf4", torch.bfloat16 if device.type == "cuda" else torch.float32, device)
out = {}
budgets = [int(b) for b in args.batched_tokens.split(",")]
sdpas, splits, buckets = args.sdpa.split(","), args.split.split(","), [int(m) for m in args.m_bucket.split(",")]
mixeds = args.mixed.split(",")
b0, s0, p0, m0, x0 = budgets[0], sdpas[0], splits[0], buckets[0], mixeds[0]
runs = [(True, b0, s0, p0, m0, x0), (False, b0, s0, p0, m0, x0), (True, b0, s0, p0, m0, x0)]
runs += [(True, b, s0, p0, m0, x0) for b in budgets[1:]] + [(True, b0, s, p0, m0, x0) for s in sdpas[1:]]
runs += [(True, b0, s0, p, m0, x0) for p in splits[1:]] + [(True, b0, s0, p0, m, x0) for m in buckets[1:]]
runs += [(True, b0, s0, p0, m0, x) for x in mixeds[1:]]
runs += [(True, b0, s0, p0, m0, x0)] if len(budgets) + len(sdpas) + len(splits) + len(buckets) + len(mixeds) > 5 else []
values = [None] * len(runs)
if args.set:  # each --set: (module, attr, values); run i sets value i of every one
    sets = []
    for spec in args.set:
        name, _, listed = spec.partition("=")
        module = {"nf4_words": nf4_words, "mixed_graphs": mixed_graphs, "engine": engine_mod}[name.split(".")[0]]
        assert hasattr(module, name.split(".")[1]), f"no {name}"
        sets.append((module, name.split(".")[1], [int(v) for v in listed.split(",")]))
    assert len({len(v) for _, _, v in sets}) == 1, "every --set names as many values"
    values = [[(module, attr, vs[i]) for module, attr, vs in sets] for i in range(len(sets[0][2]))]
    runs = [(True, b0, s0, p0, m0, x0)] * len(values)
QUIVER_SDPA = list(model_mod.SDPA_BACKENDS)
for index, ((overlap, budget, sdpa, split, bucket, mixed), value) in enumerate(zip(runs, values)):
    for module, attr, v in value or []:
        setattr(module, attr, v)
    nf4_words.PREFILL_M_BUCKET = bucket
    model_mod.SDPA_BACKENDS = QUIVER_SDPA if sdpa == "quiver" else [SDPBackend.CUDNN_ATTENTION] + QUIVER_SDPA
    e = Engine(loaded, EngineConfig(max_num_seqs=args.concurrency, max_model_len=1024, overlap=overlap,
                                    max_num_batched_tokens=budget, mixed_graphs=mixed == "on"))
    e.runner.split_decodes = split == "on"
    if e.runner.graphs is not None:
        e.runner.graphs.capture_all()
    if e.runner.mixed is not None:  # as Engine.start does (closed_loop_r12_mixed.log ran before it did)
        e.runner.mixed.capture_all()
    g = torch.Generator().manual_seed(0)
    live = []

    def new():
        live.append(e.submit(torch.randint(3, 32000, (args.prompt,), generator=g).tolist(),
                             SamplingParams(max_new_tokens=args.new, ignore_eos=True)))

    for _ in range(args.concurrency):
        new()
    times = collections.defaultdict(list)
    finished = tokens = 0
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    t_all = time.perf_counter()
    for i in range(args.steps):
        inbox, e._inbox = e._inbox, []
        e._take(inbox)
        sched = e.scheduler.schedule
        kinds = []

        def spy():
            s = sched()
            graph = e.runner.graphs is not None and e.runner.graphs.eligible(s, 16)
            kinds.append("empty" if not s else "graph" if graph else "eager")
            return s

        e.scheduler.schedule = spy
        t0 = time.perf_counter()
        e.step()
        dt = time.perf_counter() - t0
        e.scheduler.schedule = sched
        times[kinds[0]].append(dt * 1e3)
        for h in list(live):
            while not h.events.empty():
                ev = h.events.get()
                tokens += len(ev.token_ids)
                if ev.finish_reason:
                    live.remove(h)
                    finished += 1
                    new()
    sync()
    wall = time.perf_counter() - t_all
    row = {k: {"n": len(v), "mean_ms": sum(v) / len(v), "max_ms": max(v)} for k, v in times.items()}
    row.update(wall_s=wall, finished=finished, ms_per_step=wall / args.steps * 1e3, tokens=tokens,
               tok_s=tokens / wall, batched_tokens=budget, sdpa=sdpa, split=split, m_bucket=bucket, mixed=mixed)
    key = f"overlap={overlap},budget={budget},sdpa={sdpa},split={split},m_bucket={bucket},mixed={mixed}"
    key += "".join(f",{attr}={v}" for _, attr, v in value or [])
    seen = sum(k.split("#")[0] == key for k in out)
    key += f"#{seen + 1}" if seen else ""
    out[key] = row
    print(key, json.dumps(row), flush=True)
    first = f"overlap=True,budget={b0},sdpa={s0},split={p0},m_bucket={m0},mixed={x0}#2"
    if args.profile_eager and (key == first or args.set and index in (len(values) - 2, len(values) - 1)):
        from torch.profiler import ProfilerActivity, profile

        e._collect()
        live[0].cancel()  # a free place: the new prompt's prefill joins the running decodes
        new()
        inbox, e._inbox = e._inbox, []
        e._take(inbox)
        sched, shape = e.scheduler.schedule, []
        e.scheduler.schedule = lambda: (lambda s: shape.extend(i.num_tokens for i in s) or s)(sched())
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        sync()
        t0 = time.perf_counter()
        with profile(activities=acts) as prof:
            e.step()
            sync()
        print(f"eager step: {(time.perf_counter() - t0) * 1e3:.1f} ms wall under the profiler; {len(shape)} "
              f"sequences, {sum(shape)} tokens, largest chunk {max(shape, default=0)}", flush=True)
        for by in (["self_cuda_time_total"] if device.type == "cuda" else []) + ["self_cpu_time_total"]:
            print(prof.key_averages().table(sort_by=by, row_limit=25), flush=True)
    del e
    if device.type == "cuda":
        torch.cuda.empty_cache()
