"""How much of `cwac subspace` the sketch products take at the toy widths of oneoff.py.

    python benchmarks/sketch_share.py --out benchmarks/results/oneoff/sketch_share.json

Runs compute_subspace (default gradient method, contrast set) on oneoff.py's random Llamas under
torch.profiler, with a `record_function` around `cwac_plugin.subspace._gram`, the products that
build each module's moment sketch; reports their CPU time over the wall time of the run.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from torch.profiler import profile, record_function

from cwac_plugin import subspace
from cwac_plugin.config import CWACConfig
from cwac_plugin.data import write_json_atomically

from oneoff import SWEEP_WIDTHS, sweep_data
from toy import ToyTokenizer, random_llama


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    gram = subspace._gram

    def traced_gram(p, q, test):
        with record_function("cwac_gram"):
            return gram(p, q, test)

    subspace._gram = traced_gram
    safety, contrast = sweep_data()
    cfg = CWACConfig(subspace="unused", hook_point="blocks.2.hook_resid_post")
    rows = []
    for hidden in SWEEP_WIDTHS:
        model = random_llama(hidden)
        with profile() as profiler:
            start = time.perf_counter()
            subspace.compute_subspace(model, ToyTokenizer(), cfg, 128, subspace.SubspaceData(safety, contrast))
            wall = time.perf_counter() - start
        sketch = next(e for e in profiler.key_averages() if e.key == "cwac_gram").cpu_time_total / 1e6
        rows.append({"hidden_size": hidden, "subspace_seconds": round(wall, 3), "sketch_seconds": round(sketch, 3),
                     "sketch_share": round(sketch / wall, 3)})
        print(rows[-1], flush=True)
    write_json_atomically(args.out, {"threads": torch.get_num_threads(), "rows": rows})


if __name__ == "__main__":
    main()
