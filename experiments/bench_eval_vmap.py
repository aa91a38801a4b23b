"""How much faster the vmap evaluation engine is than the plain per-model loop.

    python experiments/bench_eval_vmap.py                 # K=5, ConvNet width 32, 100 x 1x28x28, 300 epochs
    python experiments/bench_eval_vmap.py --epochs 30 --threads 2 --out results/bench_eval_vmap.nc

Trains the same K models both ways (same seeds, batch orders and augmentations) on random
images, with and without DSA, and records the wall time of each and the largest disagreement of
their test accuracies. Writes an xarray Dataset with dims (augment, engine) and variables
``time_s`` and ``mean_accuracy``; the speed-up is time_s(loop) / time_s(vmap).
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass

import torch
import xarray as xr

from tesla_func.augment import DSA
from tesla_func.evaluate import EvalConfig, evaluate
from tesla_func.results import make_results, save_results


@dataclass(frozen=True)
class BenchConfig:
    num_models: int = 5  # K
    width: int = 32  # ConvNet feature maps
    images: int = 100  # training set size (one batch of 256 holds it: one step per epoch)
    side: int = 28  # image side, pixels (1 channel)
    classes: int = 10
    epochs: int = 300
    threads: int = 1  # torch intra-op threads for the run (2 cores shared with others here)
    seed: int = 0
    out: str = "results/bench_eval_vmap.nc"


def main(cfg: BenchConfig) -> xr.Dataset:
    torch.set_num_threads(cfg.threads)
    g = torch.Generator().manual_seed(cfg.seed)
    x = torch.randn(cfg.images, 1, cfg.side, cfg.side, generator=g)
    y = torch.arange(cfg.images) % cfg.classes
    xt = torch.randn(500, 1, cfg.side, cfg.side, generator=g)
    yt = torch.arange(500) % cfg.classes
    base = EvalConfig(
        arch_kwargs={"width": cfg.width},
        epochs=cfg.epochs,
        lr=0.01,
        num_models=cfg.num_models,
        seed=cfg.seed,
        progress=False,
    )
    # Warm-up: torch.func's first vmap(grad) call costs seconds of one-off set-up.
    evaluate(x, y, xt, yt, dataclasses.replace(base, epochs=1, num_models=1))
    times, accs = [], []
    for augment in (None, DSA()):
        row_t, row_a = [], []
        for use_vmap in (True, False):
            r = evaluate(x, y, xt, yt, dataclasses.replace(base, use_vmap=use_vmap), augment)
            print(
                f"augment={'dsa' if augment else 'none':4s} {r.engine:4s} {r.seconds:7.2f} s  "
                f"accuracies {[round(a, 4) for a in r.accuracies]}"
            )
            row_t.append(r.seconds)
            row_a.append(r.mean)
        times.append(row_t)
        accs.append(row_a)
        print(f"  speed-up loop / vmap: {row_t[1] / row_t[0]:.2f}x")
    return make_results(
        {
            "time_s": (("augment", "engine"), times, {"units": "s"}),
            "mean_accuracy": (("augment", "engine"), accs, {"units": "fraction"}),
        },
        coords={"augment": ["none", "dsa"], "engine": ["vmap", "loop"]},
        config=cfg,
        seed=cfg.seed,
        device="cpu",
        threads=torch.get_num_threads(),
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    for f in dataclasses.fields(BenchConfig):
        parser.add_argument(
            f"--{f.name.replace('_', '-')}", type=type(f.default), default=f.default
        )
    cfg = BenchConfig(**vars(parser.parse_args()))
    ds = main(cfg)
    print(f"wrote {save_results(ds, cfg.out)}")
