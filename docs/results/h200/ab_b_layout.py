"""Round 9's A/B of the adapter pool's LoRA B layout, run from the repository root on a CUDA machine:

    python3 docs/results/h200/ab_b_layout.py rows|rank-major <bench_engine args>
    python3 docs/results/h200/ab_b_layout.py rows|rank-major cold        (loadtest/bench_cold_load.py)

rows: the banks are patched back to row-major B ([L, S, out, R] contiguous); rank-major: as shipped."""
import dataclasses
import sys

import quiver.adapters.pool as P

if sys.argv[1] == "rows":
    orig = P.SlotPool._lora_bank

    def rows(self, name):
        new = name not in self.lora_banks
        bank = orig(self, name)
        if new:
            bank.b = bank.b.contiguous()
            for layer in range(self.base.n_layers):
                self.lora[(layer, name)] = dataclasses.replace(self.lora[(layer, name)], b=bank.b[layer])
        return bank

    P.SlotPool._lora_bank = rows
if len(sys.argv) > 2 and sys.argv[2] == "cold":
    sys.path.insert(0, "loadtest")
    import bench_cold_load  # noqa: E402

    sys.argv = sys.argv[:1]
    sys.exit(bench_cold_load.main())
from quiver.loadtest.bench_engine import main  # noqa: E402

sys.exit(main(sys.argv[2:]))
