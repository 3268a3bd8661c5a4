"""The RIOS case: NDVI of a 4-band GeoTIFF into a float32 GeoTIFF, against a serial rasterio loop.

The input is a 4-band 6000 x 6000 uint16 GeoTIFF with 512 x 512 internal tiles. Two outputs:
an uncompressed float32 GeoTIFF and the same with deflate compression. Each is written

1. by a plain serial loop over 512 x 512 windows with rasterio (read the window, compute NDVI,
   write the window): what RIOS does with one worker, and the strongest single-process
   baseline. It runs in a Python process of its own, started once and kept for the run, as a
   user's script runs: the benchmark's own process has a dask client and workers' history in
   its allocator, which made the loop's time flip between 0.24 s and 0.37 s from one call to
   the next;
2. by the same loop in a process with glibc's malloc thresholds raised as ``map_blocks``'s
   workers raise them (``MALLOC_MMAP_THRESHOLD_`` 32 MiB, ``MALLOC_TRIM_THRESHOLD_`` 64 MiB).
   A plain process does not reach these by itself on this loop: its heap is trimmed after
   every window and the next window's arrays fault in fresh pages (0.28 s to 0.40 s against
   0.23 s to 0.24 s on the 2-core machine, depending on what else the process imported). A
   tuned baseline, shown beside the target: the ratio against it is what the second worker
   adds, apart from the allocator;
3. by ``map_blocks(ex, ndvi, "in.tif", block=512, out="out.tif", creation_options=...)`` on 2
   workers at its defaults: 2 local workers, or with ``--slurm`` 2 one-core SLURM jobs already
   running (``min_workers=2`` keeps them while the serial loops take their turns).

All write the same profile (tiled 256 x 256, the input's CRS and transform, nodata -2, and the
compression); each runs once untimed first (page cache, imports), then they take turns. The
outputs are compared: pixels and profile equal. Target ratio = plain serial best / map_blocks
best; beside it, tuned serial best / map_blocks best.

Run: ``python benchmarks/rios.py [--slurm] [--repeat N] [--size N] [--workdir DIR]``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import print_header, quiet_logs  # noqa: E402

from futures_hpc import HPCExecutor  # noqa: E402
from futures_hpc.tiles import map_blocks  # noqa: E402

NODATA = -2.0
CASES = {"uncompressed": {}, "deflate": {"compress": "deflate"}}


def ndvi(block):
    red, nir = block[2].astype(np.float32), block[3].astype(np.float32)
    total = nir + red
    return np.where(total > 0, (nir - red) / np.where(total > 0, total, 1), NODATA).astype(
        np.float32)


def make_input(path, size):
    import rasterio
    from affine import Affine

    rng = np.random.default_rng(0)
    with rasterio.open(path, "w", driver="GTiff", width=size, height=size, count=4,
                       dtype="uint16", crs="EPSG:32755", tiled=True, blockxsize=512,
                       blockysize=512, transform=Affine(10, 0, 500000, 0, -10, 6100000)) as out:
        for row in range(0, size, 512):
            rows = min(512, size - row)
            window = rasterio.windows.Window(0, row, size, rows)
            out.write(rng.integers(1, 4000, (4, rows, size), dtype=np.uint16), window=window)


def output_profile(source, options):
    profile = {"driver": "GTiff", "width": source.width, "height": source.height, "count": 1,
               "dtype": "float32", "crs": source.crs, "transform": source.transform,
               "nodata": NODATA, "tiled": True, "blockxsize": 256, "blockysize": 256}
    profile.update(options)
    return profile


def serial_loop(source_path, target, options, block=512):
    """A plain windowed loop with rasterio, as RIOS runs with one worker."""
    import rasterio
    from rasterio.windows import Window

    with rasterio.open(source_path) as source, rasterio.open(
            target, "w", **output_profile(source, options)) as out:
        for row in range(0, source.height, block):
            for col in range(0, source.width, block):
                window = Window(col, row, min(block, source.width - col),
                                min(block, source.height - row))
                out.write(ndvi(source.read(window=window)), 1, window=window)


#: glibc's thresholds as map_blocks's workers set them (futures_hpc.tiles.worker).
TUNED_MALLOC = {"MALLOC_MMAP_THRESHOLD_": str(32 << 20), "MALLOC_TRIM_THRESHOLD_": str(64 << 20)}


class SerialProcess:
    """The serial loop in a Python process of its own, run on request and timed there."""

    def __init__(self, tuned_malloc: bool):
        environment = {key: value for key, value in os.environ.items()
                       if not key.startswith("MALLOC_")}
        if tuned_malloc:
            environment.update(TUNED_MALLOC)
        self.process = subprocess.Popen(
            [sys.executable, __file__, "--serial-process"], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, text=True, env=environment)

    def run(self, source_path, target, options):
        self.process.stdin.write(json.dumps([source_path, target, options]) + "\n")
        self.process.stdin.flush()
        answer = self.process.stdout.readline()
        if not answer:
            raise RuntimeError("the serial loop's process exited")
        return float(answer)

    def close(self):
        self.process.stdin.close()
        self.process.wait(timeout=60)


def serve_serial_loop():
    """``--serial-process``: run the serial loop for each request on stdin, print its seconds."""
    for line in sys.stdin:
        source_path, target, options = json.loads(line)
        start = time.perf_counter()
        serial_loop(source_path, target, options)
        print(time.perf_counter() - start, flush=True)


def ours(ex, source_path, target, options):
    map_blocks(ex, ndvi, source_path, block=512, out=target,
               creation_options={**options, "nodata": NODATA})


def same_output(first, second):
    import rasterio

    with rasterio.open(first) as a, rasterio.open(second) as b:
        return (a.profile == b.profile and a.crs == b.crs and a.transform == b.transform
                and a.nodata == b.nodata and np.array_equal(a.read(), b.read()))


def timed(method):
    """Seconds ``method`` took; a serial loop's own timing if it returns one."""
    start = time.perf_counter()
    measured = method()
    return measured if measured is not None else time.perf_counter() - start


def run_case(ex, serial_processes, source_path, workdir, name, options, repeat):
    serial_target = os.path.join(workdir, f"serial-{name}.tif")
    tuned_target = os.path.join(workdir, f"tuned-{name}.tif")
    our_target = os.path.join(workdir, f"ours-{name}.tif")
    plain, tuned = serial_processes
    methods = {"serial loop, plain process (glibc defaults)":
               lambda: plain.run(source_path, serial_target, options),
               "serial loop, malloc thresholds raised (tuned)":
               lambda: tuned.run(source_path, tuned_target, options),
               "map_blocks, 2 workers, defaults":
               lambda: ours(ex, source_path, our_target, options)}
    for method in methods.values():  # warm-up, untimed, the same for all
        method()
    seconds = {label: [] for label in methods}
    for _ in range(repeat):
        for label, method in methods.items():
            seconds[label].append(timed(method))
    identical = (same_output(serial_target, our_target)
                 and same_output(serial_target, tuned_target))
    assert identical, f"{name}: map_blocks's output differs from the serial loop's"
    serial, serial_tuned, parallel = (min(times) for times in seconds.values())
    print(f"\n{name} float32 output ({'outputs identical' if identical else 'DIFFER'})")
    for label, times in seconds.items():
        print(f"  {label:<46} best {min(times):6.3f} s   median {statistics.median(times):6.3f} s")
    print(f"  plain serial / map_blocks (best): {serial / parallel:.2f}x (target >= 1.5x)")
    print(f"  tuned serial / map_blocks (best): {serial_tuned / parallel:.2f}x (what the second "
          "worker adds, with the same allocator)")
    if not any(path.endswith(".lock") for path in os.listdir(workdir)):
        print("  no lock file beside the output")
    return serial / parallel, serial_tuned / parallel


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slurm", action="store_true", help="2 one-core SLURM jobs")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--size", type=int, default=6000)
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--serial-process", action="store_true", help=argparse.SUPPRESS)
    arguments = parser.parse_args()
    if arguments.serial_process:
        serve_serial_loop()
        return
    quiet_logs()
    backend = "slurm" if arguments.slurm else "local"
    print_header(f"NDVI of a 4-band {arguments.size}^2 uint16 GeoTIFF into float32 GeoTIFFs: "
                 f"a serial rasterio loop vs map_blocks on 2 {backend} workers")
    workdir = arguments.workdir or tempfile.mkdtemp(prefix="futures_hpc_rios_")
    os.makedirs(workdir, exist_ok=True)
    options = {"max_workers": 2}
    if arguments.slurm:
        # min_workers: the two jobs stay connected while the serial loops take their turns
        # (several seconds with deflate, longer than the automatic idle_timeout)
        options.update(cores=1, memory="2GB", walltime="00:30:00", queue="debug", min_workers=2)
    serial_processes = (SerialProcess(tuned_malloc=False), SerialProcess(tuned_malloc=True))
    try:
        source_path = os.path.join(workdir, "input.tif")
        make_input(source_path, arguments.size)
        with HPCExecutor(backend, **options) as ex:
            ex.client.wait_for_workers(2, timeout=300)
            print(f"{os.cpu_count()} cores; load average before the run "
                  f"{os.getloadavg()[0]:.2f}; each {arguments.repeat} times, taking turns")
            ratios = {name: run_case(ex, serial_processes, source_path, workdir, name, case,
                                     arguments.repeat)
                      for name, case in CASES.items()}
        print(f"\nload average after the run {os.getloadavg()[0]:.2f}")
        print("ratios against the plain serial loop (target): " + ", ".join(
            f"{name} {plain:.2f}x" for name, (plain, _) in ratios.items()))
        print("against the tuned serial loop (beside): " + ", ".join(
            f"{name} {tuned:.2f}x" for name, (_, tuned) in ratios.items()))
    finally:
        for process in serial_processes:
            process.close()
        if arguments.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
