"""Run the three gradient methods on one small matching problem and compare them.

    python experiments/compare_methods.py            # ConvNet width 32, 50 images 1x28x28, T in 2, 8
    python experiments/compare_methods.py --steps 2 8 32 --width 64

Prints, for each T: the loss of each method, how far `tesla` and `exact` are from `unrolled`
(cosine and relative error of dL/dX, dL/dbeta), the peak live tensor memory of each method and its
wall time on this machine. Under a minute on a 2-core CPU with the defaults.
"""

from __future__ import annotations

import argparse
import time

import torch

from tesla_func import METHODS, ConvNet, match_trajectory, measure_peak_memory
from tesla_func.fidelity import agreement
from tesla_func.models import init_params


def compare(steps: int, width: int, num_images: int, lr: float, seed: int) -> list[dict]:
    gen = torch.Generator().manual_seed(seed)
    model = ConvNet(channels=1, num_classes=10, image_size=28, width=width, depth=3)
    start = init_params(model, gen)
    # A target a little way along a random direction stands in for a later expert checkpoint.
    target = {k: v + 0.01 * torch.randn(v.shape, generator=gen) for k, v in start.items()}
    images = torch.randn(num_images, 1, 28, 28, generator=gen)
    labels = torch.arange(num_images) % 10
    batches = [torch.randperm(num_images, generator=gen)[: num_images // 2] for _ in range(steps)]
    rows, results = [], {}
    for method in METHODS:
        tic = time.perf_counter()
        result, peak = measure_peak_memory(
            match_trajectory,
            model,
            start,
            target,
            images,
            labels,
            torch.tensor(lr),
            batches,
            method=method,
        )
        results[method] = result
        rows.append(
            dict(
                steps=steps,
                method=method,
                loss=float(result.loss),
                peak_mb=peak.megabytes,
                seconds=time.perf_counter() - tic,
            )
        )
    for row in rows:
        close = agreement(results[row["method"]], results["unrolled"])
        row["cos_dX"] = close["images_cosine"]
        row["relerr_dX"] = close["images_relative_error"]
        row["relerr_dlr"] = close["lr_relative_error"]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, nargs="+", default=[2, 8])
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--num-images", type=int, default=50)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    header = (
        f"{'T':>3} {'method':>9} {'loss':>10} {'cos dX':>9} {'relerr dX':>10} "
        f"{'relerr dlr':>10} {'peak MB':>8} {'seconds':>8}"
    )
    print("Gradients compared with `unrolled` (exact MTT); peak = live tensor bytes, CPU.")
    print(header)
    for steps in args.steps:
        for r in compare(steps, args.width, args.num_images, args.lr, args.seed):
            print(
                f"{r['steps']:>3} {r['method']:>9} {r['loss']:>10.6f} {r['cos_dX']:>9.6f} "
                f"{r['relerr_dX']:>10.2e} {r['relerr_dlr']:>10.2e} {r['peak_mb']:>8.1f} "
                f"{r['seconds']:>8.2f}"
            )


if __name__ == "__main__":
    main()
