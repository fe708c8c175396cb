"""quiver.loadtest: load generation and benchmarks for Quiver.

Contract: importing the package loads nothing heavy (no torch, no grpc). Modules:
- workload: seeded arrival processes (Poisson, gamma), adapter popularity (Zipf, S-LoRA power
  law, uniform), length distributions, prompts and the request schedule (pure functions);
- client: the async gRPC driver (one grpc.aio channel, one task per request, progress bar);
- report: percentiles, the JSON report and its markdown table;
- cli: `python -m quiver.loadtest` / `quiver bench`, `main(argv) -> int`;
- bench_engine: engine-level decode benchmark without gRPC.
"""
