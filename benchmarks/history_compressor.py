"""The neural history compressor against a flat LSTM on the long-lag task with predictable
filler (rnndsl.training.compressor): how often the remembered symbol is predicted on 200 held-out
sequences, as training proceeds, and what each level passes up.

    python benchmarks/history_compressor.py            # about 2 minutes on 2 cores
"""
import argparse
import time

import numpy as np

import rnndsl
from rnndsl.training.compressor import HistoryCompressor, end_predicted, filler_sequences, train_level


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--spec", default="lstm")
    ap.add_argument("--hidden", type=int, default=16)
    ap.add_argument("--min-filler", type=int, default=40)
    ap.add_argument("--max-filler", type=int, default=80)
    ap.add_argument("--level0-steps", type=int, default=300)
    ap.add_argument("--level1-steps", type=int, default=100)
    ap.add_argument("--flat-steps", type=int, default=3000)
    ap.add_argument("--every", type=int, default=100, help="steps between evaluations")
    args = ap.parse_args()

    cell = rnndsl.compile(args.spec)

    def sample(rng):
        return filler_sequences(rng, 16, args.min_filler, args.max_filler)

    held = filler_sequences(np.random.default_rng(99), 200, args.min_filler, args.max_filler)
    print(f"task: remember one of 4 symbols across {args.min_filler}-{args.max_filler} steps "
          f"of predictable filler; batches of 16; {args.spec}, hidden {args.hidden}")
    print("| model | steps | last symbol predicted | passed up: level 0 | level 1 | seconds |")
    print("|---|---|---|---|---|---|")
    start = time.perf_counter()

    def row(name, model, params, steps):
        up = model.passed_up(model.compress(params, held))
        cells = [f"{u:.3f}" for u in up] + [""] * (2 - len(up))
        print(f"| {name} | {steps} | {end_predicted(model, params, held):.3f} | "
              f"{' | '.join(cells)} | {time.perf_counter() - start:.0f} |", flush=True)

    hc = HistoryCompressor(cell, 8, args.hidden, levels=2)
    params = hc.init_params(0)
    done = 0
    for level, steps in ((0, args.level0_steps), (1, args.level1_steps)):
        for chunk in range(0, steps, args.every):
            n = min(args.every, steps - chunk)
            train_level(hc, params, level, sample, n, seed=chunk)
            done += n
            row(f"compressor (training level {level})", hc, params, done)
    assert hc.decompress(params, hc.compress(params, held)) == held
    print("compressed form rebuilds all 200 held-out sequences exactly")
    start = time.perf_counter()
    flat = HistoryCompressor(cell, 8, args.hidden, levels=1)
    flat_params = flat.init_params(0)
    for chunk in range(0, args.flat_steps, args.every):
        n = min(args.every, args.flat_steps - chunk)
        train_level(flat, flat_params, 0, sample, n, seed=chunk)
        if (chunk + n) % (5 * args.every) == 0 or chunk + n == args.flat_steps:
            row(f"flat {args.spec}", flat, flat_params, chunk + n)


if __name__ == "__main__":
    main()
