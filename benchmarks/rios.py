"""The RIOS case: NDVI of a 4-band GeoTIFF into a float32 GeoTIFF, against a serial rasterio loop.

The input is a 4-band 6000 x 6000 uint16 GeoTIFF with 512 x 512 internal tiles. Two outputs:
an uncompressed float32 GeoTIFF and the same with deflate compression. Each is written

1. by a plain serial loop over 512 x 512 windows with rasterio in this process (read the
   window, compute NDVI, write the window): what RIOS does with one worker, and the strongest
   single-process baseline;
2. by ``map_blocks(ex, ndvi, "in.tif", block=512, out="out.tif", creation_options=...)`` on 2
   workers at its defaults: 2 local workers, or with ``--slurm`` 2 one-core SLURM jobs already
   running.

Both write the same profile (tiled 256 x 256, the input's CRS and transform, nodata -2, and the
compression); each side runs once untimed first (page cache, imports), then the two take turns.
The outputs are compared: pixels and profile equal. Ratio = serial best / map_blocks best.

Run: ``python benchmarks/rios.py [--slurm] [--repeat N] [--size N] [--workdir DIR]``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
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


def ours(ex, source_path, target, options):
    map_blocks(ex, ndvi, source_path, block=512, out=target,
               creation_options={**options, "nodata": NODATA})


def same_output(first, second):
    import rasterio

    with rasterio.open(first) as a, rasterio.open(second) as b:
        return (a.profile == b.profile and a.crs == b.crs and a.transform == b.transform
                and a.nodata == b.nodata and np.array_equal(a.read(), b.read()))


def run_case(ex, source_path, workdir, name, options, repeat):
    serial_target = os.path.join(workdir, f"serial-{name}.tif")
    our_target = os.path.join(workdir, f"ours-{name}.tif")
    methods = {"serial rasterio loop, 512 x 512 windows":
               lambda: serial_loop(source_path, serial_target, options),
               "map_blocks, 2 workers, defaults":
               lambda: ours(ex, source_path, our_target, options)}
    for method in methods.values():  # warm-up, untimed, the same for both
        method()
    seconds = {label: [] for label in methods}
    for _ in range(repeat):
        for label, method in methods.items():
            start = time.perf_counter()
            method()
            seconds[label].append(time.perf_counter() - start)
    identical = same_output(serial_target, our_target)
    assert identical, f"{name}: map_blocks's output differs from the serial loop's"
    serial, parallel = (min(times) for times in seconds.values())
    print(f"\n{name} float32 output ({'outputs identical' if identical else 'DIFFER'})")
    for label, times in seconds.items():
        print(f"  {label:<42} best {min(times):6.3f} s   median {statistics.median(times):6.3f} s")
    print(f"  serial / map_blocks (best): {serial / parallel:.2f}x (target >= 1.5x)")
    if not any(path.endswith(".lock") for path in os.listdir(workdir)):
        print("  no lock file beside the output")
    return serial / parallel


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slurm", action="store_true", help="2 one-core SLURM jobs")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--size", type=int, default=6000)
    parser.add_argument("--workdir", default=None)
    arguments = parser.parse_args()
    quiet_logs()
    backend = "slurm" if arguments.slurm else "local"
    print_header(f"NDVI of a 4-band {arguments.size}^2 uint16 GeoTIFF into float32 GeoTIFFs: "
                 f"a serial rasterio loop vs map_blocks on 2 {backend} workers")
    workdir = arguments.workdir or tempfile.mkdtemp(prefix="futures_hpc_rios_")
    os.makedirs(workdir, exist_ok=True)
    options = {"max_workers": 2}
    if arguments.slurm:
        options.update(cores=1, memory="2GB", walltime="00:30:00", queue="debug")
    try:
        source_path = os.path.join(workdir, "input.tif")
        make_input(source_path, arguments.size)
        with HPCExecutor(backend, **options) as ex:
            ex.client.wait_for_workers(2, timeout=300)
            print(f"{os.cpu_count()} cores; load average before the run "
                  f"{os.getloadavg()[0]:.2f}; each side {arguments.repeat} times, taking turns")
            ratios = {name: run_case(ex, source_path, workdir, name, case, arguments.repeat)
                      for name, case in CASES.items()}
        print(f"\nload average after the run {os.getloadavg()[0]:.2f}")
        print("ratios: " + ", ".join(f"{name} {value:.2f}x" for name, value in ratios.items()))
    finally:
        if arguments.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
