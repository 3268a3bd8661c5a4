"""Tests of futures_hpc.tiles: the block grid, map_blocks and reduce_blocks.

Every test that runs blocks takes the ``executor`` fixture, parametrized over ``BACKENDS``; add a
backend (e.g. "slurm") to that list and its options to ``BACKEND_OPTIONS`` to run the same tests
on it. Functions defined here are pickled by value, so workers need not import this module.
"""

from __future__ import annotations

import collections
import inspect
import logging
import os
import shutil
import sys
import time
import types

import cloudpickle
import numpy as np
import pytest
import scipy.ndimage as ndi

from conftest import require
from futures_hpc import HPCExecutor
from futures_hpc.errors import OptionError
from futures_hpc.tiles import BlockError, ImageSource, TileGrid, map_blocks, reduce_blocks
from futures_hpc.tiles.worker import held_jobs

cloudpickle.register_pickle_by_value(sys.modules[__name__])

BACKENDS = ["local", "slurm"]
BACKEND_OPTIONS = {
    "local": {"max_workers": 2},
    "slurm": {"max_workers": 2, "cores": 1, "memory": "2GB", "walltime": "00:15:00",
              "queue": "debug"},
}
WORKERS = 2

# numpy.pad mode (our ``boundary``) -> scipy.ndimage mode giving the same edge
SCIPY_MODE = {"edge": "nearest", "reflect": "mirror", "symmetric": "reflect",
              "constant": "constant"}


@pytest.fixture(scope="module", params=BACKENDS)
def executor(request):
    if request.param == "slurm":
        require(shutil.which("sbatch") is not None, "the SLURM tests need ci/slurm.sh")
    with HPCExecutor(request.param, **BACKEND_OPTIONS[request.param]) as ex:
        ex.client.wait_for_workers(WORKERS, timeout=120)  # batch jobs take a moment to start
        yield ex


def rng_image(shape, seed=0, dtype=np.float32):
    return np.random.default_rng(seed).random(shape).astype(dtype)


# ----------------------------------------------------------------------------------------------
# filters applied band by band (a 3-D block is (bands, rows, cols))
# ----------------------------------------------------------------------------------------------


def per_band(filter_2d, image):
    if image.ndim == 2:
        return filter_2d(image)
    return np.stack([filter_2d(band) for band in image])


def mean3(block, mode="nearest", cval=0.0):
    return per_band(lambda band: ndi.uniform_filter(band, size=3, mode=mode, cval=cval), block)


def sobel(block, mode="nearest", cval=0.0):
    def magnitude(band):
        band = band.astype(np.float64)
        return np.hypot(ndi.sobel(band, axis=0, mode=mode, cval=cval),
                        ndi.sobel(band, axis=1, mode=mode, cval=cval))

    return per_band(magnitude, block)


FILTERS = {"mean3": mean3, "sobel": sobel}


# ----------------------------------------------------------------------------------------------
# the grid
# ----------------------------------------------------------------------------------------------


def test_grid_cores_cover_the_image_once():
    grid = TileGrid((3, 1000, 700), block=(512, 300), overlap=2)
    assert grid.shape == (2, 3) and len(grid) == 6
    covered = np.zeros((1000, 700), int)
    for window in grid:
        covered[window.rows, window.cols] += 1
        assert window.read_rows.start == max(0, window.rows.start - 2)
        assert window.read_cols.stop == min(700, window.cols.stop + 2)
        assert window.grid_shape == (2, 3) and window.image_shape == (1000, 700)
    assert (covered == 1).all()


def test_grid_windows_edges_and_pixel_lookup():
    grid = TileGrid((1000, 700), block=512, overlap=3)
    corner = grid.window(1, 1)
    assert (corner.rows, corner.cols) == (slice(512, 1000), slice(512, 700))
    assert corner.shape == (488, 188)
    assert corner.edge_padding == ((0, 3), (0, 3))
    assert grid.window(0, 0).edge_padding == ((3, 0), (3, 0))
    assert grid.block_of(600, 10) == (1, 0)
    assert grid.window_of(511, 512).index == (0, 1)
    assert str(corner) == "block (1, 1) of (2, 2) (rows 512:1000, cols 512:700)"
    with pytest.raises(IndexError):
        grid.block_of(1000, 0)
    with pytest.raises(IndexError):
        grid.window(2, 0)


def test_block_info_georeferences_the_received_block():
    pytest.importorskip("rasterio")
    from affine import Affine

    from futures_hpc.tiles import BlockInfo
    from futures_hpc.tiles.grid import _core_in_block

    transform = Affine(10.0, 0.0, 1000.0, 0.0, -10.0, 5000.0)
    window = TileGrid((100, 100), block=32, overlap=2).window(1, 2)
    info = BlockInfo(window, _core_in_block(window, "edge"), "edge", transform)
    assert info.origin == (30, 62) and info.core == (slice(2, 34), slice(2, 34))
    assert info.block_transform == Affine(10.0, 0.0, 1620.0, 0.0, -10.0, 4700.0)
    x, y = info.pixel_coordinates((36, 36))
    assert (x[0, 0], y[0, 0]) == (1000.0 + 10 * 62.5, 5000.0 - 10 * 30.5)
    unclipped = BlockInfo(window, _core_in_block(window, None), None, transform)
    assert unclipped.core == _core_in_block(window, "edge")  # interior: same margin either way


@pytest.mark.parametrize("function", [map_blocks, reduce_blocks])
def test_executor_methods_take_the_functions_keywords(function):
    """HPCExecutor.map_blocks/reduce_blocks write the keywords out again for help()."""
    method = getattr(HPCExecutor, function.__name__)

    def keywords(callable_):
        return [parameter for parameter in inspect.signature(callable_).parameters.values()
                if parameter.kind is parameter.KEYWORD_ONLY]

    assert keywords(method) == keywords(function)


def test_executor_methods_run_the_functions(executor):
    image = rng_image((40, 24))
    np.testing.assert_allclose(executor.map_blocks(mean3, image, block=16, overlap=1),
                               mean3(image))
    total = executor.reduce_blocks(np.sum, image, combine=lambda a, b: a + b, block=16)
    assert total == pytest.approx(image.sum(dtype=np.float64), rel=1e-5)


@pytest.mark.parametrize("shape, block, overlap", [
    ((10,), 4, 0), ((2, 3, 4, 5), 4, 0), ((0, 5), 4, 0), ((10, 10), 0, 0),
    ((10, 10), (4, 4, 4), 0), ((10, 10), 4, -1), ((10, 10), "4", 0)])
def test_grid_rejects_bad_arguments(shape, block, overlap):
    with pytest.raises(ValueError):
        TileGrid(shape, block, overlap)


# ----------------------------------------------------------------------------------------------
# filters equal scipy on the whole image
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("boundary", ["edge", "reflect", "symmetric", "constant", None])
@pytest.mark.parametrize("filter_name", ["mean3", "sobel"])
@pytest.mark.parametrize("shape", [(45, 37), (2, 45, 37)], ids=["2d", "3d"])
def test_filter_equals_scipy_on_whole_image(executor, shape, filter_name, boundary):
    image = rng_image(shape)
    filter_function = FILTERS[filter_name]
    fill_value = 0.25
    if boundary is None:
        # no margin beyond the edge: func's own edge mode applies there
        expected = filter_function(image, mode="nearest")
    elif boundary == "constant":
        # scipy's "constant" pads each pass of a separable filter with cval (a Sobel's smoothing
        # pass then sees cval, not the derivative of a cval border), so compare with scipy on
        # the whole image padded once, which is what map_blocks promises
        margin = ((0, 0),) * (image.ndim - 2) + ((1, 1), (1, 1))
        padded = np.pad(image, margin, mode="constant", constant_values=fill_value)
        expected = filter_function(padded)[..., 1:-1, 1:-1]
    else:
        expected = filter_function(image, mode=SCIPY_MODE[boundary])
    result = map_blocks(executor, filter_function, image, block=(16, 12), overlap=1,
                        boundary=boundary, fill_value=fill_value)
    assert result.shape == expected.shape
    np.testing.assert_allclose(result, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("blocks_per_task", [1, (2, 3), None], ids=["1", "2x3", "auto"])
@pytest.mark.parametrize("shared_memory", [False, True], ids=["sockets", "shared-memory"])
def test_wide_margin_task_groups_and_both_transports(executor, shared_memory, blocks_per_task):
    image = rng_image((50, 41), seed=3)

    def mean5(block):
        return ndi.uniform_filter(block, size=5, mode="constant")

    expected = ndi.uniform_filter(image, size=5, mode="reflect")
    result = map_blocks(executor, mean5, image, block=(8, 16), overlap=2, boundary="symmetric",
                        shared_memory=shared_memory, blocks_per_task=blocks_per_task)
    np.testing.assert_allclose(result, expected, rtol=1e-6)


def test_workers_are_asked_about_shared_memory_again_only_when_they_change(monkeypatch):
    """A real local executor; the broadcast that asks the workers is counted by a spy.

    The spy calls the real function: every answer comes from the real workers. The same
    workers are asked once; after a restart (new worker processes, new addresses) again.
    """
    import futures_hpc.tiles.shared_memory as shared_memory_module

    require(shared_memory_module.shared_memory_available(), "needs a writable /dev/shm")
    asked = []
    ask = shared_memory_module._ask_workers_for_token
    monkeypatch.setattr(shared_memory_module, "_ask_workers_for_token",
                        lambda executor: asked.append(ask(executor)) or asked[-1])
    image = rng_image((48, 40), seed=5)
    expected = ndi.uniform_filter(image, size=3, mode="nearest")

    def mean3(block):
        return ndi.uniform_filter(block, size=3, mode="nearest")

    with HPCExecutor("local", max_workers=2) as ex:
        ex.client.wait_for_workers(2, timeout=60)
        for _ in range(3):
            np.testing.assert_allclose(map_blocks(ex, mean3, image, block=16, overlap=1),
                                       expected, rtol=1e-6)
        assert asked == [True]
        before = set(ex.client.nthreads())
        ex.client.restart()
        ex.client.wait_for_workers(2, timeout=60)
        assert not before & set(ex.client.nthreads())
        np.testing.assert_allclose(map_blocks(ex, mean3, image, block=16, overlap=1,
                                              shared_memory=True), expected, rtol=1e-6)
        assert asked == [True, True]


class StubClient:
    def __init__(self, threads, memory_per_worker):
        self.workers = {f"w{i}": {"nthreads": 1, "memory_limit": memory_per_worker}
                        for i in range(threads)}

    def scheduler_info(self, n_workers=-1):
        return {"workers": self.workers}


class StubExecutor:
    def __init__(self, threads=2, memory_per_worker=8 << 30):
        self.client = StubClient(threads, memory_per_worker)


def test_task_groups_avoid_decoding_neighbouring_chunks():
    zarr = pytest.importorskip("zarr")
    from futures_hpc.tiles import ZarrSource
    from futures_hpc.tiles.plan import _choose_blocks_per_task, _read_amplification

    image = zarr.create_array(store={}, shape=(16384, 16384), chunks=(1024, 1024), dtype="f4")
    grid = TileGrid(image.shape, block=2048, overlap=1)
    assert _read_amplification(grid, (1, 1), (1024, 1024)) == 4.0  # 4 x 4 chunks for 2 x 2
    # 256 MiB per task at most, 4 tasks per thread: 16 blocks, full width (no column margins)
    one_thread = StubExecutor(threads=1)
    assert _choose_blocks_per_task(grid, [ZarrSource(image, "in")], one_thread) == (2, 8)
    # workers with little memory get small tasks: 1 GiB / 8 = 128 MiB = 8 blocks
    small = StubExecutor(threads=1, memory_per_worker=1 << 30)
    assert _choose_blocks_per_task(grid, [ZarrSource(image, "in")], small) == (2, 4)
    # 2 threads want 8 tasks: 8 blocks, in the squarer shape
    assert _choose_blocks_per_task(grid, [ZarrSource(image, "in")], StubExecutor()) == (2, 4)
    # without overlap nothing is decoded twice; many threads keep groups small enough
    plain = TileGrid(image.shape, block=2048, overlap=0)
    assert _choose_blocks_per_task(plain, [ZarrSource(image, "in")],
                                   StubExecutor(threads=64)) == (1, 1)


def test_task_groups_cut_the_grid_evenly():
    """12 x 12 blocks, 2 threads, at most 18 blocks a task: 8 groups of 18, not 2 x 9's
    6 of 18 and 6 of 6 (the workers would wait for the large ones at the end)."""
    from futures_hpc.tiles.arrays import ArraySource
    from futures_hpc.tiles.plan import _choose_blocks_per_task

    bands = np.broadcast_to(np.zeros(1, dtype=np.uint16), (4, 6000, 6000))
    grid = TileGrid(bands.shape, block=512)
    assert grid.shape == (12, 12)
    rows, cols = _choose_blocks_per_task(grid, [ArraySource(bands, "in")], StubExecutor())
    assert rows * cols == 18
    assert 12 % rows == 0 and 12 % cols == 0, (rows, cols)
    assert (rows, cols) == (3, 6)  # the wider of the even cuts with the fewest groups


def test_margin_wider_than_image_matches_numpy_pad(executor):
    image = rng_image((5, 7), seed=4)
    margin = 9

    def sum_window(block):
        return ndi.uniform_filter(block, size=2 * margin + 1, mode="constant")

    padded = np.pad(image, margin, mode="reflect")
    expected = ndi.uniform_filter(padded, size=2 * margin + 1)[margin:-margin, margin:-margin]
    result = map_blocks(executor, sum_window, image, block=3, overlap=margin, boundary="reflect")
    np.testing.assert_allclose(result, expected, rtol=1e-5)


# ----------------------------------------------------------------------------------------------
# several inputs, info, output bands and types
# ----------------------------------------------------------------------------------------------


def ndvi(red, nir):
    red, nir = red.astype(np.float32), nir.astype(np.float32)
    return (nir - red) / np.maximum(nir + red, 1e-6)


def test_ndvi_from_two_inputs(executor):
    red = np.random.default_rng(1).integers(0, 4000, (70, 53)).astype(np.uint16)
    nir = np.random.default_rng(2).integers(0, 4000, (70, 53)).astype(np.uint16)
    result = map_blocks(executor, ndvi, red, nir, block=(32, 32))
    np.testing.assert_allclose(result, ndvi(red, nir), rtol=1e-6)
    assert result.dtype == np.float32


def block_index_bands(block, info):
    rows, cols = block.shape[-2:]
    core = np.zeros(block.shape[-2:], bool)
    core[info.core] = True
    return np.stack([np.full((rows, cols), info.index[0]), np.full((rows, cols), info.index[1]),
                     core])


def test_info_names_the_block_and_its_core(executor):
    image = rng_image((40, 30))
    grid = TileGrid(image.shape, (16, 16), 2)
    result = map_blocks(executor, block_index_bands, image, block=(16, 16), overlap=2,
                        boundary=None, dtype=np.int16)
    assert result.shape == (3, 40, 30) and result.dtype == np.int16
    for window in grid:
        assert (result[0, window.rows, window.cols] == window.index[0]).all()
        assert (result[1, window.rows, window.cols] == window.index[1]).all()
    assert (result[2] == 1).all()  # info.core is exactly what is kept


def test_out_array_is_filled_and_returned(executor):
    image = rng_image((33, 29))
    out = np.full((33, 29), -1.0)
    returned = map_blocks(executor, mean3, image, block=16, overlap=1, out=out)
    assert returned is out
    np.testing.assert_allclose(out, mean3(image), rtol=1e-6)


def test_progress_callback_counts_every_block(executor):
    seen = []
    map_blocks(executor, np.negative, rng_image((20, 20)), block=8, blocks_per_task=(1, 2),
               progress=lambda done, total: seen.append((done, total)))
    assert seen[-1] == (9, 9)
    assert [done for done, _ in seen] == sorted({done for done, _ in seen})  # only increases


# ----------------------------------------------------------------------------------------------
# files and stores, read and written by the workers
# ----------------------------------------------------------------------------------------------


def test_npy_in_and_memmap_out(executor, tmp_path):
    image = rng_image((2, 37, 44))
    np.save(tmp_path / "in.npy", image)
    out = np.lib.format.open_memmap(tmp_path / "out.npy", mode="w+", dtype=np.float32,
                                    shape=image.shape)
    map_blocks(executor, mean3, str(tmp_path / "in.npy"), block=(16, 16), overlap=1, out=out)
    np.testing.assert_allclose(np.load(tmp_path / "out.npy"), mean3(image), rtol=1e-6)


def test_npy_path_out_is_created(executor, tmp_path):
    image = rng_image((37, 44))
    target = tmp_path / "result.npy"
    returned = map_blocks(executor, mean3, image, block=16, overlap=1, out=str(target))
    assert returned == str(target)
    np.testing.assert_allclose(np.load(target), mean3(image), rtol=1e-6)


def test_zarr_in_and_zarr_out(executor, tmp_path):
    zarr = pytest.importorskip("zarr")
    image = rng_image((3, 70, 50))
    source = zarr.create_array(store=str(tmp_path / "in.zarr"), shape=image.shape,
                               chunks=(1, 32, 32), dtype=image.dtype)
    source[...] = image
    target = str(tmp_path / "out.zarr")
    map_blocks(executor, sobel, str(tmp_path / "in.zarr"), block=(32, 32), overlap=1,
               boundary="reflect", out=target, dtype=np.float32)
    written = zarr.open_array(target, mode="r")
    assert written.shape == image.shape
    np.testing.assert_allclose(written[...], sobel(image, mode="mirror"), rtol=1e-5, atol=1e-6)


def test_existing_zarr_out_must_align_with_blocks(executor, tmp_path):
    zarr = pytest.importorskip("zarr")
    image = rng_image((64, 64))
    out = zarr.create_array(store=str(tmp_path / "out.zarr"), shape=(64, 64), chunks=(20, 32),
                            dtype="f4")
    with pytest.raises(ValueError, match=r"multiple of out's zarr chunks \(20, 32\)"):
        map_blocks(executor, mean3, image, block=(32, 32), overlap=1, out=out)
    map_blocks(executor, mean3, image, block=(40, 32), overlap=1, out=out)
    np.testing.assert_allclose(out[...], mean3(image), rtol=1e-6)


def write_geotiff(path, data, transform, crs):
    rasterio = pytest.importorskip("rasterio")
    with rasterio.open(path, "w", driver="GTiff", height=data.shape[-2], width=data.shape[-1],
                       count=data.shape[0], dtype=data.dtype.name, transform=transform,
                       crs=crs) as dataset:
        dataset.write(data)


def ndvi_and_x(image, info):
    x, _ = info.pixel_coordinates(image.shape[-2:])
    return np.stack([ndvi(image[2], image[3]), x.astype(np.float32)])


def test_geotiff_in_and_out_keeps_georeferencing(executor, tmp_path):
    rasterio = pytest.importorskip("rasterio")
    from affine import Affine

    transform = Affine(30.0, 0.0, 500000.0, 0.0, -30.0, 6100000.0)
    bands = np.random.default_rng(5).integers(1, 5000, (4, 61, 47)).astype(np.uint16)
    write_geotiff(tmp_path / "in.tif", bands, transform, "EPSG:32755")
    target = tmp_path / "out.tif"
    map_blocks(executor, ndvi_and_x, str(tmp_path / "in.tif"), block=(32, 16), out=str(target))
    with rasterio.open(target) as result:
        assert result.transform == transform
        assert result.crs.to_epsg() == 32755
        assert result.count == 2 and result.dtypes[0] == "float32"
        np.testing.assert_allclose(result.read(1), ndvi(bands[2], bands[3]), rtol=1e-6)
        expected_x = 500000.0 + 30.0 * (np.arange(47) + 0.5)
        np.testing.assert_allclose(result.read(2), np.broadcast_to(expected_x, (61, 47)))
    assert not os.path.exists(str(target) + ".lock")


def band_mean3(image):
    return np.stack([ndi.uniform_filter(band.astype(np.float32), size=3, mode="nearest")
                     for band in image])


@pytest.mark.parametrize("boundary", ["edge", "reflect", 7.0, None])
def test_raster_read_block_by_block_equals_the_same_image_in_memory(executor, tmp_path,
                                                                      boundary):
    """A raster's blocks are read one by one (``reads_each_block``), an array's cut from its
    group's region: with margins, every boundary and groups of blocks, both give the same."""
    from affine import Affine

    bands = np.random.default_rng(11).integers(1, 5000, (3, 77, 53)).astype(np.uint16)
    write_geotiff(tmp_path / "in.tif", bands, Affine(10, 0, 0, 0, -10, 0), "EPSG:32755")
    options = dict(block=(16, 16), overlap=2, boundary=boundary, blocks_per_task=(2, 3))
    from_raster = map_blocks(executor, band_mean3, str(tmp_path / "in.tif"), **options)
    from_memory = map_blocks(executor, band_mean3, bands, **options)
    np.testing.assert_array_equal(from_raster, from_memory)
    if boundary == "edge":  # a 3 x 3 mean inside a 2-pixel margin is the whole image's
        np.testing.assert_allclose(from_raster, band_mean3(bands), rtol=1e-6)


def test_a_task_reads_a_raster_block_by_block_and_an_array_by_group(tmp_path):
    """Which reads a task makes, counted on the real sources (run in this process)."""
    from affine import Affine

    from futures_hpc.tiles.arrays import RawFileSource
    from futures_hpc.tiles.grid import _Group
    from futures_hpc.tiles.raster import RasterioSource
    from futures_hpc.tiles.worker import _BlockJob

    bands = np.random.default_rng(3).integers(1, 5000, (2, 40, 40)).astype(np.uint16)
    write_geotiff(tmp_path / "in.tif", bands, Affine(10, 0, 0, 0, -10, 0), "EPSG:32755")
    np.save(tmp_path / "in.npy", bands)
    reads = collections.defaultdict(list)

    def counted(source):
        read = source.read

        def counting_read(rows, cols):
            reads[source.name].append((rows, cols))
            return read(rows, cols)

        source.read = counting_read
        return source

    raster = counted(RasterioSource(str(tmp_path / "in.tif"), "raster"))
    raw = counted(RawFileSource(str(tmp_path / "in.npy"), np.load(tmp_path / "in.npy",
                                mmap_mode="r").offset, bands.shape, bands.dtype, "raw"))
    grid = TileGrid((40, 40), (10, 10), (1, 1))
    group = _Group.of([grid.window(row, col) for row in range(2) for col in range(3)])
    job = _BlockJob(func=lambda a, b: a[0].astype(np.int64) + b[1], sources=[raster, raw],
                    boundary="edge", fill_value=0, passes_info=False, passes_otherargs=False,
                    otherargs=None, georeference=None, dtype=None, combine=None,
                    stops_at_first_error=True)
    outcome = job.run(group, None, None)
    assert reads["raster"] == [
        (window.read_rows, window.read_cols) for window in group.windows]
    assert reads["raw"] == [(group.window.read_rows, group.window.read_cols)]
    expected = bands[0, :20, :30].astype(np.int64) + bands[1, :20, :30]
    np.testing.assert_array_equal(outcome.data, expected)


GEOTIFF_OPTIONS = {
    "plain": {},
    "deflate": {"compress": "deflate"},
    "deflate-band-interleave": {"compress": "deflate", "interleave": "band"},
    "lzw-predictor": {"compress": "lzw", "predictor": 2},
}


def ndvi_and_red(image):
    return np.stack([ndvi(image[2], image[3]), image[2].astype(np.float32)])


def serial_geotiff(source, target, func, options, block):
    """What a plain windowed rasterio loop writes (RIOS with one worker)."""
    import rasterio
    from rasterio.windows import Window as RasterioWindow

    with rasterio.open(source) as inputs:
        profile = {"driver": "GTiff", "width": inputs.width, "height": inputs.height,
                   "count": 2, "dtype": "float32", "crs": inputs.crs,
                   "transform": inputs.transform, "nodata": -9.0, "tiled": True,
                   "blockxsize": 16, "blockysize": 16, **options}
        with rasterio.open(target, "w", **profile) as out:
            for row in range(0, inputs.height, block):
                for col in range(0, inputs.width, block):
                    window = RasterioWindow(col, row, min(block, inputs.width - col),
                                            min(block, inputs.height - row))
                    out.write(func(inputs.read(window=window)), window=window)


@pytest.mark.parametrize("options", list(GEOTIFF_OPTIONS.values()), ids=list(GEOTIFF_OPTIONS))
def test_geotiff_output_equals_the_serial_loop_and_takes_no_lock(executor, tmp_path, options):
    rasterio = pytest.importorskip("rasterio")
    from affine import Affine

    bands = np.random.default_rng(8).integers(1, 5000, (4, 83, 101)).astype(np.uint16)
    write_geotiff(tmp_path / "in.tif", bands, Affine(30.0, 0, 500000.0, 0, -30.0, 6.1e6),
                  "EPSG:32755")
    serial_geotiff(tmp_path / "in.tif", tmp_path / "serial.tif", ndvi_and_red, options, 32)
    target = tmp_path / "out.tif"
    map_blocks(executor, ndvi_and_red, str(tmp_path / "in.tif"), block=32, out=str(target),
               blocks_per_task=(1, 2),
               creation_options={**options, "nodata": -9.0, "blockxsize": 16,
                                 "blockysize": 16})
    with rasterio.open(target) as ours, rasterio.open(tmp_path / "serial.tif") as theirs:
        assert ours.profile == theirs.profile
        assert (ours.crs, ours.transform, ours.nodata) == (theirs.crs, theirs.transform, -9.0)
        np.testing.assert_array_equal(ours.read(), theirs.read())
    assert sorted(os.listdir(tmp_path)) == ["in.tif", "out.tif", "serial.tif"]  # no lock file


DEFLATE_16 = {"compress": "deflate", "nodata": -9.0, "blockxsize": 16, "blockysize": 16}


def deflate_case(tmp_path):
    """An input GeoTIFF and the serial loop's deflate output of it."""
    from affine import Affine

    bands = np.random.default_rng(8).integers(1, 5000, (4, 83, 101)).astype(np.uint16)
    write_geotiff(tmp_path / "in.tif", bands, Affine(30.0, 0, 500000.0, 0, -30.0, 6.1e6),
                  "EPSG:32755")
    serial_geotiff(tmp_path / "in.tif", tmp_path / "serial.tif", ndvi_and_red,
                   {"compress": "deflate"}, 32)
    return str(tmp_path / "in.tif"), tmp_path / "serial.tif"


def assert_same_geotiff(ours_path, theirs_path):
    rasterio = pytest.importorskip("rasterio")
    with rasterio.open(ours_path) as ours, rasterio.open(theirs_path) as theirs:
        assert ours.profile == theirs.profile
        np.testing.assert_array_equal(ours.read(), theirs.read())


def test_compressed_tiles_stay_on_the_workers_that_made_them(executor, tmp_path, monkeypatch):
    """Workers send the client their tiles' sizes only, write the tiles themselves where the
    client placed them, and hold nothing once the run is over."""
    pytest.importorskip("rasterio")
    from futures_hpc.tiles import geotiff
    from futures_hpc.tiles.held_tiles import held_count

    source, serial = deflate_case(tmp_path)
    received = []  # what reached the client's appender, group by group
    real_add = geotiff.TileAppender.add

    def add(self, rows, cols, tiles, blocks, sync=False):
        received.append(type(tiles).__name__)
        return real_add(self, rows, cols, tiles, blocks, sync)

    monkeypatch.setattr(geotiff.TileAppender, "add", add)
    map_blocks(executor, ndvi_and_red, source, block=32, out=str(tmp_path / "out.tif"),
               blocks_per_task=(1, 2), creation_options=DEFLATE_16)
    assert_same_geotiff(tmp_path / "out.tif", serial)
    # 3 x 4 blocks in groups of 1 x 2: 6 groups; the probe's few pixels come as an array
    assert received.count("HeldTiles") == 6, received
    assert "EncodedTiles" not in received
    assert set(executor.client.run(held_count).values()) == {0}


def _swap_on_worker(name, replacement):
    """Run on every worker: replace ``held_tiles.<name>`` (None: put the original back)."""
    from futures_hpc.tiles import held_tiles

    originals = held_tiles.__dict__.setdefault("_test_originals", {})
    originals.setdefault(name, getattr(held_tiles, name))
    setattr(held_tiles, name, originals[name] if replacement is None else replacement)


def _holds_nothing(token, group, indices):
    return None


def _file_not_visible(path, payloads, offsets, sync):
    raise FileNotFoundError(path)


@pytest.mark.parametrize("name, replacement", [("take", _holds_nothing),
                                               ("write_tiles", _file_not_visible)],
                         ids=["holder-gone", "file-not-visible"])
def test_held_tiles_are_made_again_or_written_by_the_client(executor, tmp_path, name,
                                                            replacement):
    """A worker that must write tiles it does not hold (the one that made them left) makes
    them again; one that cannot see the file sends them to the client, which writes them.

    Neither can be timed for real between a group's two tasks here, so every worker's
    ``held_tiles.take`` (or ``write_tiles``) is replaced for this test and put back after.
    """
    pytest.importorskip("rasterio")
    source, serial = deflate_case(tmp_path)
    executor.client.run(_swap_on_worker, name, replacement)
    try:
        map_blocks(executor, ndvi_and_red, source, block=32, out=str(tmp_path / "out.tif"),
                   blocks_per_task=(1, 2), creation_options=DEFLATE_16)
    finally:
        executor.client.run(_swap_on_worker, name, None)
    assert_same_geotiff(tmp_path / "out.tif", serial)


def _double(value):
    return 2 * value


def test_a_held_write_bound_to_a_worker_that_left_goes_to_another(executor):
    """The write task of tiles held by a worker that is gone (here: an address no worker has)
    waits in dask's no-worker state; the wait notices and sends it to any worker."""
    from futures_hpc.tiles.api import HELD_WRITE_CHECK_SECONDS, _HeldWrite

    client = executor.client
    submitted = []

    def submit(workers):
        submitted.append(workers)
        return client.submit(_double, 21, workers=workers, pure=False)

    gone = "tls://192.0.2.1:1"
    write = _HeldWrite(submit, gone, lambda: set(client.scheduler_info(n_workers=-1)["workers"]))
    time.sleep(0.5)
    assert not write.done()  # bound to a worker that is not there: it does not run
    assert write.result(timeout=10 * HELD_WRITE_CHECK_SECONDS) == 42
    assert submitted == [[gone], None]


def test_compressed_geotiff_blocks_that_cut_tiles_and_failed_blocks(executor, tmp_path):
    """Blocks that are not whole tiles: the client writes; a failed block leaves empty tiles."""
    rasterio = pytest.importorskip("rasterio")
    image = rng_image((70, 90), seed=3)

    def fails_on_one_block(block, info):
        if info.index == (1, 1):
            raise ValueError("on purpose")
        return block + 1

    for block, out in ((24, "cut.tif"), (32, "whole.tif")):
        with pytest.raises(BlockError) as caught:
            map_blocks(executor, fails_on_one_block, image, block=block, out=str(tmp_path / out),
                       on_error="continue", creation_options={"compress": "deflate"})
        assert [window.index for window, _ in caught.value.failures] == [(1, 1)]
        with rasterio.open(tmp_path / out) as result:
            assert result.profile["compress"] == "deflate"
            pixels = result.read(1)
        expected = image + 1
        expected[block:2 * block, block:2 * block] = 0
        np.testing.assert_array_equal(pixels, expected)
    assert sorted(os.listdir(tmp_path)) == ["cut.tif", "whole.tif"]


class ClientOnlySource(ImageSource):
    """An input only the client's process can read, as a file outside the workers' view."""

    def __init__(self, array):
        self.array = array
        self.shape = array.shape
        self.dtype = array.dtype
        self.name = "client-only input"
        self.client_pid = os.getpid()

    def read(self, rows, cols):
        if os.getpid() != self.client_pid:
            raise FileNotFoundError("not on this worker")
        return self.array[..., rows, cols]


def test_input_workers_cannot_see_goes_through_the_client(executor):
    image = rng_image((30, 30))
    result = map_blocks(executor, mean3, ClientOnlySource(image), block=16, overlap=1)
    np.testing.assert_allclose(result, mean3(image), rtol=1e-6)


# ----------------------------------------------------------------------------------------------
# reduce_blocks
# ----------------------------------------------------------------------------------------------


def histogram_counts(block):
    return np.histogram(block, bins=16, range=(0.0, 1.0))[0]


def test_histogram_by_reduce_blocks_equals_numpy(executor):
    image = rng_image((2, 83, 67))
    counts = reduce_blocks(executor, histogram_counts, image, combine=np.add, block=(32, 20))
    np.testing.assert_array_equal(counts, np.histogram(image, bins=16, range=(0.0, 1.0))[0])


def core_min_max(block, info):
    core = block[..., info.core[0], info.core[1]]
    return float(core.min()), float(core.max())


def test_min_max_with_initial_and_margins(executor):
    image = rng_image((50, 50), seed=9)
    image[49, 49], image[0, 0] = 7.0, -7.0
    low, high = reduce_blocks(
        executor, core_min_max, image, block=16, overlap=2, boundary="constant",
        fill_value=100.0, initial=(np.inf, -np.inf),
        combine=lambda so_far, part: (min(so_far[0], part[0]), max(so_far[1], part[1])))
    assert (low, high) == (-7.0, 7.0)


# ----------------------------------------------------------------------------------------------
# otherargs reach each worker once
# ----------------------------------------------------------------------------------------------


def load_counted(log_path, table):
    with open(log_path, "a") as log:
        log.write(f"{os.getpid()}\n")
    return CountedTable(log_path, table)


class CountedTable:
    """A lookup table that logs the process id each time it is unpickled."""

    def __init__(self, log_path, table):
        self.log_path = log_path
        self.table = table

    def __reduce__(self):
        return load_counted, (self.log_path, self.table)


def apply_table(block, otherargs):
    return otherargs.table[block]


def test_otherargs_reach_each_worker_once(executor, tmp_path):
    log_path = str(tmp_path / "loads.log")
    table = np.arange(256, dtype=np.int32) * 3
    image = np.random.default_rng(0).integers(0, 256, (64, 48)).astype(np.uint8)
    result = map_blocks(executor, apply_table, image, block=8, blocks_per_task=1,
                        otherargs=CountedTable(log_path, table))
    np.testing.assert_array_equal(result, table[image])
    with open(log_path) as log:
        loads = collections.Counter(line.strip() for line in log)
    assert str(os.getpid()) not in loads  # the client never unpickles it
    assert 1 <= len(loads) <= WORKERS
    assert set(loads.values()) == {1}, f"unpickled more than once in a worker: {loads}"
    assert TileGrid(image.shape, 8).__len__() == 48  # far more blocks than workers


def test_otherargs_unpickled_once_even_when_dask_drops_a_replica(executor, tmp_path):
    """dask's active memory manager drops replicas of the broadcast job mid-run (as it did under
    load in CI); a worker that fetches the job again must not unpickle otherargs again."""
    log_path = str(tmp_path / "loads.log")
    table = np.arange(256, dtype=np.int32) * 5
    image = np.random.default_rng(1).integers(0, 256, (64, 64)).astype(np.uint8)
    dropped = []

    def drop_replicas(done, total):
        if done >= 8 and not dropped:
            executor.client.amm.run_once()  # the policy that dropped the replica in CI
            dropped.append(done)

    result = map_blocks(executor, apply_table, image, block=8, blocks_per_task=1,
                        max_in_flight=2, progress=drop_replicas,
                        otherargs=CountedTable(log_path, table))
    np.testing.assert_array_equal(result, table[image])
    assert dropped, "the progress callback never ran"
    with open(log_path) as log:
        loads = collections.Counter(line.strip() for line in log)
    assert set(loads.values()) == {1}, f"unpickled more than once in a worker: {loads}"


# ----------------------------------------------------------------------------------------------
# errors
# ----------------------------------------------------------------------------------------------


def fail_on_pixel(block, info):
    if info.window.rows.start <= 40 < info.window.rows.stop and info.window.cols.start == 16:
        raise ZeroDivisionError("bad pixel")
    return block


def test_failing_block_names_its_window(executor):
    image = rng_image((64, 48))
    with pytest.raises(BlockError, match=r"block \(2, 1\) of \(4, 3\) \(rows 32:48, cols 16:32\)"
                       r".*ZeroDivisionError: bad pixel") as caught:
        map_blocks(executor, fail_on_pixel, image, block=16)
    window, exception = caught.value.failures[0]
    assert window.index == (2, 1) and isinstance(exception, ZeroDivisionError)
    assert isinstance(caught.value.__cause__, ZeroDivisionError)


def fail_on_two_blocks(block, info):
    if info.index in {(0, 1), (3, 2)}:
        raise ValueError(f"refused {info.index}")
    return block * 2


def test_on_error_continue_runs_every_other_block(executor):
    image = rng_image((64, 48))
    with pytest.raises(BlockError) as caught:
        map_blocks(executor, fail_on_two_blocks, image, block=16, on_error="continue")
    failed = sorted(window.index for window, _ in caught.value.failures)
    assert failed == [(0, 1), (3, 2)]
    assert "rows 0:16, cols 16:32" in str(caught.value)
    assert "rows 48:64, cols 32:48" in str(caught.value)
    output = caught.value.output
    good = np.ones(image.shape, bool)
    good[0:16, 16:32] = good[48:64, 32:48] = False
    np.testing.assert_array_equal(output[good], image[good] * 2)


def wrong_shape(block):
    return block[1:]


def test_func_returning_the_wrong_shape_names_the_window(executor):
    with pytest.raises(BlockError, match=r"returned shape \(15, 16\).*rows 0:16, cols 0:16"):
        map_blocks(executor, wrong_shape, rng_image((32, 32)), block=16, shared_memory=False)


def never_called(*blocks):
    raise AssertionError("no block may run")


@pytest.mark.parametrize("inputs, options, message", [
    ([np.zeros((10, 12)), np.zeros((3, 10, 13))], {},
     r"input 0: \(10, 12\), input 1: \(3, 10, 13\)"),
    ([np.zeros(10)], {}, r"shape \(10,\)"),
    ([np.zeros((2, 2, 10, 10))], {}, r"shape \(2, 2, 10, 10\)"),
    ([], {}, "at least one input"),
    ([np.zeros((10, 10))], {"boundary": "wrap"}, "boundary must be one of"),
    ([np.zeros((10, 10))], {"block": (0, 4)}, "block must be"),
    ([np.zeros((10, 10))], {"overlap": -1}, "overlap must be"),
    ([np.zeros((10, 10))], {"otherargs": 1}, "no 'otherargs' keyword"),
    ([np.zeros((10, 10))], {"out": np.zeros((10, 11))}, r"out has shape \(10, 11\)"),
    ([np.zeros((10, 10))], {"out": "result.png"}, "suffix"),
    ([np.zeros((10, 10))], {"on_error": "ignore"}, "on_error must be"),
    ([np.zeros((10, 10))], {"max_in_flight": 0}, "max_in_flight"),
    ([np.zeros((10, 10))], {"out": "never.tif", "creation_options": "deflate"},
     "creation_options='deflate' is not allowed"),
    ([np.zeros((10, 10))], {"out": "never.tif", "creation_options": {"compress": "zip"}},
     "compress='zip' is not allowed.*deflate"),
    ([np.zeros((10, 10))], {"out": "never.npy", "creation_options": {"compress": "deflate"}},
     "they are for a GeoTIFF"),
])
def test_bad_arguments_raise_before_any_work(executor, inputs, options, message):
    with pytest.raises(ValueError, match=message):
        map_blocks(executor, never_called, *inputs, **options)


def test_bad_input_types(executor):
    with pytest.raises(TypeError, match="input 0"):
        map_blocks(executor, never_called, [[1, 2], [3, 4]])
    with pytest.raises(FileNotFoundError):
        map_blocks(executor, never_called, "/nonexistent/image.npy")
    with pytest.raises(OptionError, match="combine"):
        reduce_blocks(executor, never_called, np.zeros((4, 4)), combine=None)


# ----------------------------------------------------------------------------------------------
# bounded hand-out
# ----------------------------------------------------------------------------------------------


def log_interval(block, info, otherargs):
    start = time.monotonic()
    time.sleep(0.02)
    with open(otherargs, "a") as log:
        log.write(f"{start} {time.monotonic()}\n")
    return block


def test_max_in_flight_bounds_concurrent_blocks(executor, tmp_path):
    log_path = str(tmp_path / "intervals.log")
    image = rng_image((32, 32))
    map_blocks(executor, log_interval, image, block=8, max_in_flight=1, blocks_per_task=1,
               otherargs=log_path, out=np.empty_like(image))  # an existing out: no probe call
    with open(log_path) as log:
        intervals = sorted(tuple(map(float, line.split())) for line in log)
    assert len(intervals) == 16
    pairs = zip(intervals, intervals[1:], strict=False)
    assert all(end <= next_start for (_, end), (next_start, _) in pairs)


# ----------------------------------------------------------------------------------------------
# what a finished run leaves on the workers
# ----------------------------------------------------------------------------------------------


def test_finished_run_is_dropped_from_the_workers(executor, caplog):
    before = executor.client.run(held_jobs)
    image = np.arange(64 * 48).reshape(64, 48) % 256
    table = types.SimpleNamespace(table=np.arange(256) * 7)
    with caplog.at_level(logging.DEBUG, logger="futures_hpc"):
        result = map_blocks(executor, apply_table, image, block=8, blocks_per_task=1,
                            otherargs=table)
    assert result[1, 2] == (48 + 2) * 7
    assert "Combination not supported" not in caplog.text
    deadline = time.monotonic() + 10  # the workers drop the job in the background
    while True:
        left = {worker: set(tokens) - set(before.get(worker, ()))
                for worker, tokens in executor.client.run(held_jobs).items()}
        if not any(left.values()) or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert not any(left.values()), f"the workers still hold the finished run's job: {left}"
