"""One throughput point, run as a script in a fresh process against whichever tree ``PYTHONPATH``
names (the code under test or a checkout of an earlier commit): ``python worker.py '<request>'``.

It uses only the public API both trees share (Distiller, DistillConfig, evaluate, the data and
expert records), builds random data and random expert trajectories of the requested shapes (no
files), times distillation iterations and evaluation epochs, and prints one JSON line. Imported
as a module it offers :func:`run`, which the in-process smoke test calls.

torch and the library are imported inside the functions, after ``__main__`` has taken this
folder off ``sys.path``: as a script, its own modules (``config.py``, ``report.py``, ...) would
otherwise shadow any top-level module of the same name that torch or the tree under test imports.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from typing import Any


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def fake_run(request: dict[str, Any]):
    """(dataset, experts): random images of the setting's shape and two random trajectories
    (the target a little way from the start each epoch, as in expert training)."""
    import torch

    from tesla_func.data import Dataset, DatasetInfo
    from tesla_func.experts import ExpertTrajectory
    from tesla_func.models import ConvNet, ConvNetConfig, init_params

    c, side, k = request["channels"], request["image_size"], request["num_classes"]
    gen = torch.Generator().manual_seed(request.get("seed", 0))
    info = DatasetInfo(name=request["dataset"], num_classes=k, channels=c, image_size=side,
                       class_names=tuple(str(i) for i in range(k)), mean=(0.5,) * c,
                       std=(0.25,) * c, zca=False, zca_eps=None, source="random (benchmark)")
    per_class = max(request["ipc"], 10)
    train = torch.randn(per_class * k, c, side, side, generator=gen)
    test = torch.randn(2 * k * 10, c, side, side, generator=gen)
    dataset = Dataset(info, train, torch.arange(per_class * k) % k, test,
                      torch.arange(test.shape[0]) % k)
    config = ConvNetConfig(channels=c, num_classes=k, image_size=side, width=request["width"],
                           depth=request["depth"])
    experts = []
    for _ in range(2):
        params = [init_params(ConvNet(config), gen)]
        for _ in range(request["expert_epochs"]):
            params.append({n: v + 0.01 * torch.randn(v.shape, generator=gen)
                           for n, v in params[-1].items()})
        experts.append(ExpertTrajectory(config, request["dataset"], tuple(params),
                                        (0.1,) * len(params), 0.01,
                                        {"dataset_info": info.to_dict()}))
    return dataset, experts


def run(request: dict[str, Any]) -> dict[str, Any]:
    """Time ``eval_epochs`` evaluation epochs (after one) on the initial synthetic set, then
    ``iterations`` distillation iterations (after ``warmup``) of the requested setting; the
    result as JSON-able data. Evaluation first: after a distillation the allocator's state made
    the same epochs up to 2x slower in one tree and not the other."""
    import torch

    from tesla_func.augment import DSA, FAMILIES
    from tesla_func.distill import DistillConfig, Distiller
    from tesla_func.evaluate import EvalConfig, evaluate

    torch.set_num_threads(request["threads"])
    device = request["device"]
    dataset, experts = fake_run(request)
    cfg = DistillConfig(ipc=request["ipc"], method=request["method"],
                        syn_steps=request["syn_steps"], batch_syn=request["batch_syn"],
                        match_epochs=2, max_start_epoch=2,
                        lr_img=300.0, lr_lr=1.0, lr_grad_clip=0.5, iterations=10**6,
                        save_every=10**6, eval_models=1, device=device, seed=request["seed"])
    out: dict[str, Any] = {"torch": torch.__version__, "threads": torch.get_num_threads()}
    c = experts[0].config
    with tempfile.TemporaryDirectory() as tmp:
        distiller = Distiller(cfg, tmp, progress=False, dataset=dataset, experts=experts)
        images, labels = distiller.state.images.detach(), distiller.classes
        for family in FAMILIES:  # one-off costs (kernel set-up, imports) before any timing
            DSA().apply(images[:2], DSA().sample(2, torch.Generator(), family=family,
                                                 device=images.device, dtype=images.dtype))

        def epochs(n: int) -> tuple[float, float]:
            protocol = EvalConfig(arch="convnet", epochs=n, lr=0.01, num_models=1,
                                  arch_kwargs={"width": c.width, "depth": c.depth},
                                  device=device, progress=False)
            wall, cpu = time.perf_counter(), time.process_time()
            evaluate(images, labels, dataset.test_images.to(device),
                     dataset.test_labels.to(device), protocol, DSA(),
                     num_classes=dataset.info.num_classes)
            _sync(device)
            return time.perf_counter() - wall, time.process_time() - cpu

        epochs(1)  # warm-up
        wall, cpu = epochs(request["eval_epochs"])
        out["eval_epoch_s"] = wall / request["eval_epochs"]
        out["eval_epoch_cpu_s"] = cpu / request["eval_epochs"]
        times = []
        for _ in range(request["warmup"] + request["iterations"]):
            wall, cpu = time.perf_counter(), time.process_time()
            distiller.step()
            _sync(device)
            times.append((time.perf_counter() - wall, time.process_time() - cpu))
        choice = getattr(distiller, "keep_choice", None)
        out["keep_graphs"] = choice.keep if choice is not None else cfg.keep_graphs
        out["first_iteration_s"] = times[0][0]  # the warm-up, with any start-up choice in it
        timed = times[request["warmup"]:]
        out["iteration_s"] = min(t for t, _ in timed)
        out["iteration_cpu_s"] = min(c for _, c in timed)
        out["loss"] = distiller.state.log["loss"][-1]
    return out


if __name__ == "__main__":
    sys.path.pop(0)  # this folder: the tree under test comes from PYTHONPATH only
    print(json.dumps(run(json.loads(sys.argv[1]))))
