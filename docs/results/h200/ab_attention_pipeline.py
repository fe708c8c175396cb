"""Round 9's engine A/B of the attention pipeline, run from the repository root on a CUDA machine:

    python3 docs/results/h200/ab_attention_pipeline.py 0|1 --model llama2-7b --quantize nf4 --batch 1,32 --adapters 0,32

sets kernels/attention.py DECODE_PIPELINE_SUM (the MHA path), then runs bench_engine."""
import sys

import quiver.kernels.attention as A

A.DECODE_PIPELINE_SUM = sys.argv[1] == "1"
from quiver.loadtest.bench_engine import main  # noqa: E402

sys.exit(main(sys.argv[2:]))
