"""How well the simulator's per-operator roofline predicts GPU timings it was not fitted on.

The timings are Vidur's (microsoft/vidur, MIT licence), measured on real A100-80GB and H100 GPUs;
a copy with its provenance is in ../shared/calibration/vidur/. For each GPU: fit on Llama-2-7B
(every tensor-parallel degree), predict Llama-2-70B at tensor-parallel 1, and the reverse; per
operator and for the whole layer. Attention (A100 only, one shape): fit on every other context
length or chunk size, predict the rest. `--write-fits` refits the shipped efficiencies on every
table (server/simulate/fits/).

    .venv/bin/python benchmarks/sim_calibrate.py [--vidur DIR] [--write-fits] [--output FILE]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from server.simulate.calibration import (
    DEFAULT_DIR,
    attention_errors,
    cross_model_errors,
    fit_device,
)
from server.simulate.roofline import FITS_DIR


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--vidur", type=Path, default=DEFAULT_DIR, help="the calibration folder")
    p.add_argument("--write-fits", action="store_true", help="refit server/simulate/fits/*.json")
    p.add_argument("--output", default="results/sim_calibrate.json")
    args = p.parse_args()
    if not args.vidur.is_dir():
        print(f"no calibration data at {args.vidur}", file=sys.stderr)
        return 2
    started = time.perf_counter()
    rows = cross_model_errors(args.vidur)
    attention = attention_errors(args.vidur)
    print("median (p90) relative error on rows not fitted on; layer = the sum of its operators")
    print(f"{'gpu':<10}{'fitted on':<16}{'predicted':<16}{'operators':>16}{'GEMMs':>16}"
          f"{'layer':>16}")  # fmt: skip
    for r in rows:
        cells = [
            f"{r[k]['median']:.1%} ({r[k]['p90']:.0%})" for k in ("operators", "gemms", "layer")
        ]
        print(f"{r['gpu']:<10}{r['fitted_on']:<16}{r['predicted']:<16}"
              + "".join(f"{c:>16}" for c in cells))  # fmt: skip
    for r in attention:
        print(f"a100-80g  {r['operator']:<32}{r['median']:>16.1%} (p90 {r['p90']:.0%}, "
              f"{r['rows']} rows)")  # fmt: skip
    if args.write_fits:
        for folder in ("a100", "h100"):
            fit_device(folder, args.vidur).save(FITS_DIR / f"{folder}.json")
            print(f"wrote {FITS_DIR / f'{folder}.json'}")
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"cross_model": rows, "attention": attention,
                               "source": str(args.vidur)}, indent=2))  # fmt: skip
    print(f"wrote {out} in {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
