"""The `quiver` command: `serve` runs the server, `generate` calls a running one.

    quiver serve                      # embedded SmolLM2-135M-Instruct, NF4, 127.0.0.1:50051
    quiver serve --model DIR_OR_GGUF --quantize none --dtype float32 --port 50052
    quiver serve --metrics-port 9200                  # Prometheus /metrics (default 9095; -1 = off)
    quiver generate "Tell me a joke" --max-new-tokens 64 [--stream] [--chat]
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading

from quiver.server.config import (DEFAULT_METRICS_PORT, DTYPE_CHOICES, QUANTIZE_CHOICES, EngineConfig, ModelConfig,
                                  ServerConfig)


def add_serve_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None,
                   help="local Hugging Face model directory or .gguf file (default: embedded SmolLM2-135M-Instruct)")
    p.add_argument("--quantize", choices=QUANTIZE_CHOICES, default="nf4", help="base weights at load (default nf4)")
    p.add_argument("--dtype", choices=DTYPE_CHOICES, default="auto",
                   help="compute dtype (default: bfloat16 on CUDA, float32 on CPU)")
    p.add_argument("--device", default="auto", help="cuda, cpu or auto (default)")
    p.add_argument("--nf4-kernel", choices=("triton", "bnb"), default="triton",
                   help="NF4 matmul on CUDA: Quiver's fused Triton W4A16 kernel (default) or bitsandbytes'")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=50051)
    p.add_argument("--metrics-port", type=int, default=DEFAULT_METRICS_PORT,
                   help=f"Prometheus metrics at http://HOST:PORT/metrics on --host (default {DEFAULT_METRICS_PORT}; "
                        "0 = any free port, logged at start; -1 = no metrics)")
    p.add_argument("--adapter-dir", default=None, help="serve every adapter directory under DIR by its folder name")
    p.add_argument("--adapter-slots", type=int, default=16, help="adapters resident on the accelerator at once")
    p.add_argument("--max-rank", type=int, default=64, help="largest LoRA / bottleneck rank accepted")
    p.add_argument("--pinned-mib", type=int, default=1024,
                   help="page-locked host memory pinned at start for adapters staged for the GPU (0 = pin per adapter)")
    p.add_argument("--max-num-seqs", type=int, default=32, help="running sequences per step")
    p.add_argument("--max-num-batched-tokens", type=int, default=512, help="tokens per step")
    p.add_argument("--max-model-len", type=int, default=2048, help="prompt + new tokens per sequence")
    p.add_argument("--num-blocks", type=int, default=0, help="KV-cache blocks (0 = derive)")
    p.add_argument("--block-size", type=int, default=16, help="tokens per KV block")
    p.add_argument("--overlap", choices=("auto", "on", "off"), default="auto",
                   help="launch each decode step before the last step's tokens reach the host, so host work "
                        "overlaps the device's (default auto: on with CUDA)")
    p.add_argument("--mixed-graphs", choices=("auto", "on", "off"), default="auto",
                   help="steps with a prefill chunk replay captured per-layer graphs around an eager attention "
                        "instead of launching every op (default auto: on with CUDA)")
    p.add_argument("--warmup", choices=("auto", "on", "off"), default="auto",
                   help="run short requests through the engine at start so the first requests do not wait for "
                        "kernel compilation (default auto: on with CUDA)")


SWITCH = {"auto": None, "on": True, "off": False}  # auto|on|off flags -> EngineConfig (None = on with CUDA)


def serve(args: argparse.Namespace) -> int:
    from quiver.server.app import BindError, Server
    from quiver.adapters.files import AdapterError
    from quiver.server.loader import ModelLoadError

    try:
        if args.metrics_port < -1:
            raise ValueError(f"--metrics-port must be a port, 0 (any free port) or -1 (off), got {args.metrics_port}")
        server_cfg = ServerConfig(host=args.host, port=args.port, adapter_dir=args.adapter_dir,
                                  adapter_slots=args.adapter_slots, max_rank=args.max_rank, pinned_mib=args.pinned_mib,
                                  metrics_port=None if args.metrics_port == -1 else args.metrics_port)
        model_cfg = ModelConfig(model=args.model, quantize=args.quantize, dtype=args.dtype, device=args.device,
                                nf4_kernel=args.nf4_kernel)
        engine_cfg = EngineConfig(block_size=args.block_size, num_blocks=args.num_blocks,
                                  max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                                  max_model_len=args.max_model_len,
                                  overlap=SWITCH[args.overlap], warmup=SWITCH[args.warmup],
                                  mixed_graphs=SWITCH[args.mixed_graphs])
    except ValueError as exc:  # a flag out of range: say which, no traceback
        print(f"quiver serve: {exc}", file=sys.stderr)
        return 2
    server = Server(server_cfg, model_cfg, engine_cfg)
    done = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: done.set())
    try:
        port = server.start()
    except (ModelLoadError, AdapterError, BindError) as exc:
        print(f"quiver: {exc}", file=sys.stderr)
        server.stop(0)
        return 2
    loaded = server.loaded
    print(f"quiver: serving {loaded.name} ({loaded.quantize}, {str(loaded.dtype).removeprefix('torch.')}, "
          f"{loaded.device}) on {args.host}:{port}; resident weights {loaded.weight_bytes / 2**20:.1f} MiB, "
          f"KV cache {server.engine.kv.nbytes() / 2**20:.1f} MiB", flush=True)
    if server.metrics_url:
        print(f"quiver: metrics at {server.metrics_url}", flush=True)
    done.wait()
    print("quiver: shutting down", flush=True)
    server.stop()
    return 0


def generate(args: argparse.Namespace) -> int:
    import grpc

    from quiver.server.pb import quiver_pb2 as pb
    from quiver.server.pb import quiver_pb2_grpc as pb_grpc

    req = pb.GenerateRequest(adapter_id=args.adapter or "", max_new_tokens=args.max_new_tokens,
                             temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, stop=args.stop or [])
    if args.seed is not None:
        req.seed = args.seed
    if args.chat:
        req.messages.add(role="user", content=args.prompt)
    else:
        req.prompt = args.prompt
    stub = pb_grpc.QuiverStub(grpc.insecure_channel(args.target))
    try:
        if args.stream:
            last = None
            for msg in stub.GenerateStream(req, timeout=args.timeout):
                print(msg.text, end="", flush=True)
                last = msg
            print()
            if last is not None:
                print(f"[{last.finish_reason}; {last.prompt_tokens} prompt + {last.completion_tokens} new tokens]",
                      file=sys.stderr)
        else:
            resp = stub.Generate(req, timeout=args.timeout)
            print(resp.text)
            print(f"[{resp.finish_reason}; {resp.prompt_tokens} prompt + {resp.completion_tokens} new tokens]",
                  file=sys.stderr)
    except grpc.RpcError as exc:
        print(f"quiver: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="quiver", description="Quiver multi-adapter LLM inference server")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("serve", help="load the model and serve gRPC")
    add_serve_args(p)
    p.add_argument("--log-level", default="INFO")
    g = sub.add_parser("generate", help="one-shot call against a running server")
    g.add_argument("prompt")
    g.add_argument("--target", default="127.0.0.1:50051")
    g.add_argument("--adapter", default="", help="adapter id (default: base model)")
    g.add_argument("--max-new-tokens", type=int, default=128)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-p", type=float, default=0.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--stop", action="append", help="stop string (repeatable)")
    g.add_argument("--chat", action="store_true", help="send the prompt as a user message (chat template)")
    g.add_argument("--stream", action="store_true", help="print tokens as they come")
    g.add_argument("--timeout", type=float, default=300.0)
    from quiver.loadtest.cli import add_arguments, run

    b = sub.add_parser("bench", help="load-test a running server (same as python -m quiver.loadtest)")
    add_arguments(b)
    args = parser.parse_args(argv)
    if args.command == "bench":
        return run(args, b)
    if args.command == "serve":
        logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        return serve(args)
    return generate(args)


if __name__ == "__main__":
    sys.exit(main())
