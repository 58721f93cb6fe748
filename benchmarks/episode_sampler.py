"""Benchmark EpisodeSampler throughput (episodes/s) on Omniglot-shaped data; prints JSON.

Uses the real ``images_background_small1.zip`` from ``$METAGRAD_DATA/omniglot`` when
present (decoded into a temporary cache folder), else random uint8 ``[2720, 1, 28, 28]``.

    METAGRAD_DATA=/work/shared/data python benchmarks/episode_sampler.py
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

from metagrad.data import EpisodeSampler, Omniglot


def load_data():
    env = os.environ.get("METAGRAD_DATA")
    if env and (Path(env) / "omniglot" / "images_background_small1.zip").exists():
        with tempfile.TemporaryDirectory() as tmp:
            ds = Omniglot(env, "small1", cache_dir=tmp)
        return ds.images, ds.labels, "omniglot-small1"
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (136 * 20, 1, 28, 28), dtype=torch.uint8, generator=g)
    labels = torch.arange(136).repeat_interleave(20)
    return images, labels, "random-uint8"


def measure(sampler: EpisodeSampler, batch_size: int, seconds: float) -> float:
    for _ in range(20):
        sampler.sample(batch_size)
    n, start = 0, time.perf_counter()
    while True:
        sampler.sample(batch_size)
        n += batch_size
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            return n / elapsed


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ways", type=int, default=5)
    p.add_argument("--shots", type=int, default=1)
    p.add_argument("--queries", type=int, default=15)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16, 32])
    p.add_argument("--seconds", type=float, default=2.0)
    p.add_argument("--repeats", type=int, default=3, help="report the best of this many timings")
    p.add_argument("--device", default="cpu")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads (default 1, as in a data-loading worker; 0 keeps torch's default). "
        "On a shared 2-core machine, 2 OpenMP threads competing with other processes can be 100x slower.",
    )
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    load_start = os.getloadavg()[0]

    images, labels, source = load_data()
    sampler = EpisodeSampler(images, labels, args.ways, args.shots, args.queries, seed=0, device=args.device)
    results = {}
    for b in args.batch_sizes:
        results[str(b)] = round(max(measure(sampler, b, args.seconds) for _ in range(args.repeats)), 1)
    print(
        json.dumps(
            {
                "benchmark": "episode_sampler",
                "data": source,
                "num_images": int(images.shape[0]),
                "num_classes": int(torch.unique(labels).numel()),
                "ways": args.ways,
                "shots": args.shots,
                "queries": args.queries,
                "device": args.device,
                "torch_threads": torch.get_num_threads(),
                "cpu_count": os.cpu_count(),
                "torch": torch.__version__,
                "python": platform.python_version(),
                "loadavg_1min_start_end": [round(load_start, 2), round(os.getloadavg()[0], 2)],
                "episodes_per_s_by_batch_size": results,
            }
        )
    )


if __name__ == "__main__":
    main()
