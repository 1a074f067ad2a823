"""Tests of core.io: read_image in every supported format, and the BBBC010 reader."""

from __future__ import annotations

from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest
import tifffile

from napari_instseg.core.io import bbbc010_wells, read_bbbc010, read_image, read_image_2d


def _ramp(*shape: int, dtype=np.uint16) -> np.ndarray:
    return np.arange(int(np.prod(shape)), dtype=np.int64).reshape(shape).astype(dtype)


# ---------------------------------------------------------------- read_image: TIFF


def test_tiff_2d_grayscale(tmp_path):
    data = _ramp(20, 30)
    tifffile.imwrite(tmp_path / "a.tif", data)
    out = read_image(tmp_path / "a.tif")
    assert out.shape == (1, 1, 20, 30)
    assert out.dtype == np.uint16
    np.testing.assert_array_equal(out[0, 0], data)


def test_tiff_multipage_is_stack_of_planes(tmp_path):
    data = _ramp(3, 20, 30)  # three pages of a grayscale stack
    tifffile.imwrite(tmp_path / "stack.tiff", data, photometric="minisblack")
    assert len(tifffile.TiffFile(tmp_path / "stack.tiff").pages) == 3
    out = read_image(tmp_path / "stack.tiff")
    assert out.shape == (3, 1, 20, 30)
    np.testing.assert_array_equal(out[2, 0], data[2])


def test_tiff_rgb_uses_samples_axis(tmp_path):
    data = _ramp(20, 30, 3, dtype=np.uint8)
    tifffile.imwrite(tmp_path / "rgb.tif", data, photometric="rgb")
    out = read_image(tmp_path / "rgb.tif")
    assert out.shape == (1, 3, 20, 30)
    np.testing.assert_array_equal(out[0, 1], data[..., 1])


def test_tiff_imagej_axes_zcyx(tmp_path):
    data = _ramp(5, 2, 20, 30)
    tifffile.imwrite(tmp_path / "hyper.tif", data, imagej=True, metadata={"axes": "ZCYX"})
    out = read_image(tmp_path / "hyper.tif")
    assert out.shape == (5, 2, 20, 30)
    np.testing.assert_array_equal(out[4, 1], data[4, 1])


def test_tiff_imagej_time_and_z_flattened_to_planes(tmp_path):
    data = _ramp(2, 3, 20, 30)
    tifffile.imwrite(tmp_path / "tz.tif", data, imagej=True, metadata={"axes": "TZYX"})
    out = read_image(tmp_path / "tz.tif")
    assert out.shape == (6, 1, 20, 30)
    np.testing.assert_array_equal(out[4, 0], data[1, 1])


def test_planar_rgb_tiff_is_channels(tmp_path):
    data = _ramp(3, 20, 30, dtype=np.uint8)
    tifffile.imwrite(tmp_path / "planar.tif", data)  # tifffile stores this as planar RGB
    out = read_image(tmp_path / "planar.tif")
    assert out.shape == (1, 3, 20, 30)
    np.testing.assert_array_equal(out[0, 2], data[2])


def test_channel_axis_overrides_guess(tmp_path):
    data = _ramp(3, 20, 30)
    tifffile.imwrite(tmp_path / "c.tif", data, photometric="minisblack")
    assert read_image(tmp_path / "c.tif").shape == (3, 1, 20, 30)  # metadata says pages
    out = read_image(tmp_path / "c.tif", channel_axis=0)
    assert out.shape == (1, 3, 20, 30)
    np.testing.assert_array_equal(out[0, 2], data[2])
    out = read_image(tmp_path / "c.tif", channel_axis=-1)  # 30 "channels" of 3 x 20
    assert out.shape == (1, 30, 3, 20)
    np.testing.assert_array_equal(out[0, 7], data[:, :, 7])


def test_bool_becomes_uint8(tmp_path):
    data = np.zeros((8, 9), bool)
    data[2:4, 3:5] = True
    tifffile.imwrite(tmp_path / "b.tif", data)
    out = read_image(tmp_path / "b.tif")
    assert out.dtype == np.uint8
    assert out.sum() == 4


def test_float_tiff_keeps_dtype(tmp_path):
    data = np.linspace(0, 1, 20 * 30, dtype=np.float32).reshape(20, 30)
    tifffile.imwrite(tmp_path / "f.tif", data)
    out = read_image(tmp_path / "f.tif")
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out[0, 0], data)


# ---------------------------------------------------------------- read_image: PNG


def test_png_gray_and_rgb(tmp_path):
    gray = _ramp(20, 30, dtype=np.uint8)
    iio.imwrite(tmp_path / "g.png", gray)
    assert read_image(tmp_path / "g.png").shape == (1, 1, 20, 30)
    rgb = np.stack([gray, 255 - gray, gray // 2], axis=-1)
    iio.imwrite(tmp_path / "rgb.png", rgb)
    out = read_image(tmp_path / "rgb.png")
    assert out.shape == (1, 3, 20, 30)
    np.testing.assert_array_equal(out[0, 1], 255 - gray)


def test_png_opaque_alpha_dropped_but_real_alpha_kept(tmp_path):
    gray = _ramp(20, 30, dtype=np.uint8)
    rgba = np.stack([gray, gray, gray, np.full_like(gray, 255)], axis=-1)
    iio.imwrite(tmp_path / "opaque.png", rgba)
    assert read_image(tmp_path / "opaque.png").shape == (1, 3, 20, 30)
    rgba[..., 3] = gray
    iio.imwrite(tmp_path / "alpha.png", rgba)
    assert read_image(tmp_path / "alpha.png").shape == (1, 4, 20, 30)


def test_png_16bit(tmp_path):
    data = _ramp(20, 30) * 50
    iio.imwrite(tmp_path / "d.png", data)
    out = read_image(tmp_path / "d.png")
    assert out.dtype == np.uint16
    np.testing.assert_array_equal(out[0, 0], data)


# ---------------------------------------------------------------- read_image: zarr


def test_zarr_array(tmp_path):
    import zarr

    data = _ramp(2, 20, 30)
    arr = zarr.open_array(str(tmp_path / "a.zarr"), mode="w", shape=data.shape, dtype=data.dtype)
    arr[...] = data
    out = read_image(tmp_path / "a.zarr")
    assert out.shape == (1, 2, 20, 30)  # a short first axis is taken for channels
    np.testing.assert_array_equal(out[0, 1], data[1])


def test_zarr_group_array_zero(tmp_path):
    import zarr

    data = _ramp(20, 30)
    group = zarr.open_group(str(tmp_path / "g.zarr"), mode="w")
    group.create_array("0", shape=data.shape, dtype=data.dtype)[...] = data
    group.create_array("1", shape=(10, 15), dtype=data.dtype)
    out = read_image(tmp_path / "g.zarr")
    assert out.shape == (1, 1, 20, 30)
    np.testing.assert_array_equal(out[0, 0], data)


@pytest.mark.parametrize("version", ["0.4", "0.5"])
def test_ome_zarr_first_level_and_axes(tmp_path, version):
    import zarr

    # c, z, y, x: 2 channels, 3 planes; without the metadata a short second axis would be
    # taken for the channels. Level "1" is a smaller copy listed second, level "0" is at
    # a path other than "0" to check that the metadata is followed.
    data = _ramp(2, 3, 64, 96)
    axes = [{"name": "c", "type": "channel"}] + [
        {"name": n, "type": "space"} for n in ("z", "y", "x")
    ]
    multiscales = [
        {"version": version, "axes": axes, "datasets": [{"path": "full"}, {"path": "half"}]}
    ]
    zarr_format = 2 if version == "0.4" else 3
    group = zarr.open_group(str(tmp_path / "img.ome.zarr"), mode="w", zarr_format=zarr_format)
    group.attrs.update(
        {"multiscales": multiscales} if version == "0.4" else {"ome": {"multiscales": multiscales}}
    )
    group.create_array("full", shape=data.shape, dtype=data.dtype)[...] = data
    group.create_array("half", shape=(2, 3, 32, 48), dtype=data.dtype)
    out = read_image(tmp_path / "img.ome.zarr")
    assert out.shape == (3, 2, 64, 96)
    np.testing.assert_array_equal(out[2, 1], data[1, 2])


# ---------------------------------------------------------------- read_image: errors


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.tif"):
        read_image(tmp_path / "nope.tif")


def test_corrupt_tiff_error_names_the_file(tmp_path):
    (tmp_path / "broken.tif").write_bytes(b"hello, not a TIFF")
    with pytest.raises(ValueError, match="broken.tif"):
        read_image(tmp_path / "broken.tif")


def test_unknown_extension(tmp_path):
    (tmp_path / "image.xyz").write_bytes(b"1234")
    with pytest.raises(ValueError, match="unknown file type"):
        read_image(tmp_path / "image.xyz")


@pytest.mark.parametrize(
    ("shape", "match"),
    [((7,), "1D"), ((2, 3, 4, 5, 6), "5D"), ((0, 5), "empty")],
)
@pytest.mark.filterwarnings("ignore:.*zero-size array:UserWarning")
def test_bad_dimensionality(tmp_path, shape, match):
    tifffile.imwrite(tmp_path / "bad.tif", np.zeros(shape, np.uint8))
    with pytest.raises(ValueError, match=match):
        read_image(tmp_path / "bad.tif")


def test_5d_with_singleton_axes_is_fine(tmp_path):
    data = _ramp(1, 4, 1, 20, 30)
    tifffile.imwrite(tmp_path / "s.tif", data, imagej=True, metadata={"axes": "TZCYX"})
    assert read_image(tmp_path / "s.tif").shape == (4, 1, 20, 30)


def test_non_numeric_dtype(tmp_path):
    import zarr

    arr = zarr.open_array(str(tmp_path / "c.zarr"), mode="w", shape=(4, 4), dtype="complex64")
    arr[...] = 1j
    with pytest.raises(ValueError, match="dtype"):
        read_image(tmp_path / "c.zarr")


def test_bad_channel_axis(tmp_path):
    tifffile.imwrite(tmp_path / "a.tif", _ramp(20, 30))
    with pytest.raises(ValueError, match="no channel axis"):
        read_image(tmp_path / "a.tif", channel_axis=0)
    tifffile.imwrite(tmp_path / "b.tif", _ramp(3, 20, 30), photometric="minisblack")
    with pytest.raises(ValueError, match="out of range"):
        read_image(tmp_path / "b.tif", channel_axis=3)


def test_read_image_2d(tmp_path):
    data = _ramp(3, 20, 30)
    tifffile.imwrite(tmp_path / "stack.tif", data, photometric="minisblack")
    plane = read_image_2d(tmp_path / "stack.tif", plane=-1)
    assert plane.shape == (1, 20, 30)
    np.testing.assert_array_equal(plane[0], data[-1])
    with pytest.raises(IndexError, match="3 plane"):
        read_image_2d(tmp_path / "stack.tif", plane=3)


def test_top_level_api_exports_read_image():
    import napari_instseg as nis

    assert nis.read_image is read_image


# ---------------------------------------------------------------- BBBC010 (fake and real)


def _fake_bbbc010(root: Path, wells=("A01", "A02"), shape=(24, 32), n=3) -> Path:
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    rng = np.random.default_rng(0)
    for well in wells:
        for channel in ("w1", "w2"):
            image = rng.integers(100, 3000, shape, dtype=np.uint16)
            name = f"1649_1109_0003_Amp5-1_B_20070424_{well}_{channel}_ABCD-1234.tif"
            tifffile.imwrite(root / "images" / name, image)
        for k in range(n):
            mask = np.zeros(shape, np.uint8)
            mask[4 + 3 * k : 10 + 3 * k, 5:20] = 255  # consecutive masks overlap
            iio.imwrite(root / "masks" / f"{well}_{k + 1:02d}_ground_truth.png", mask)
    return root


def test_fake_bbbc010_reads_overlapping_masks(tmp_path):
    root = _fake_bbbc010(tmp_path / "bbbc")
    assert bbbc010_wells(root) == ["A01", "A02"]
    (sample,) = read_bbbc010(root, wells="A02")
    assert sample.name == "A02"
    assert sample.image.shape == (24, 32) and sample.image.dtype == np.float32
    assert sample.masks.shape == (3, 24, 32)
    assert sample.masks.sum(axis=0).max() == 2  # overlaps kept
    assert sample.channels["w1"].shape == (24, 32)
    assert read_bbbc010(root, wells=["A01"], with_w1=False)[0].channels == {}


def test_fake_bbbc010_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_bbbc010(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="images/"):
        read_bbbc010(tmp_path / "empty")
    root = _fake_bbbc010(tmp_path / "bbbc")
    with pytest.raises(FileNotFoundError, match="B07"):
        read_bbbc010(root, wells=["A01", "B07"])
    # a well with an image but no masks
    tifffile.imwrite(
        root / "images" / "1649_1109_0003_Amp5-1_B_20070424_A03_w2_ABCD-1234.tif",
        np.zeros((24, 32), np.uint16),
    )
    with pytest.raises(FileNotFoundError, match="A03"):
        read_bbbc010(root, wells=["A03"])
    # a mask of the wrong size
    iio.imwrite(root / "masks" / "A01_04_ground_truth.png", np.zeros((20, 32), np.uint8))
    with pytest.raises(ValueError, match="A01_04_ground_truth.png"):
        read_bbbc010(root, wells=["A01"])


def test_fake_bbbc010_without_masks_folder(tmp_path):
    root = _fake_bbbc010(tmp_path / "bbbc")
    for path in (root / "masks").iterdir():
        path.unlink()
    (root / "masks").rmdir()
    with pytest.raises(FileNotFoundError, match="masks/"):
        read_bbbc010(root)


def _read_bbbc010_serially(root: Path, wells, with_w1: bool = True) -> list:
    """What read_bbbc010 returned before it decoded on threads: imageio, file by file."""
    import re

    from napari_instseg.core.types import Sample

    images = {}
    for path in (root / "images").iterdir():
        m = re.search(r"_([A-P]\d{2})_(w[12])_", path.name)
        images[m[1], m[2]] = path
    samples = []
    for well in wells:
        image = tifffile.imread(images[well, "w2"]).astype(np.float32)
        channels = {}
        if with_w1 and (well, "w1") in images:
            channels["w1"] = tifffile.imread(images[well, "w1"]).astype(np.float32)
        files = sorted(
            (int(p.name.split("_")[1]), p) for p in (root / "masks").glob(f"{well}_*.png")
        )
        stack = []
        for _, path in files:
            mask = np.asarray(iio.imread(path))
            stack.append((mask[..., 0] if mask.ndim == 3 else mask) > 0)
        samples.append(Sample(image, np.stack(stack), name=well, channels=channels))
    return samples


def test_threaded_bbbc010_reading_equals_the_serial_imageio_reading(tmp_path):
    """Masks in every PNG flavour (grey, 1-bit, 16-bit, RGB, grey + alpha, a palette whose
    index 0 is not black) decode to the masks imageio gave, on 1 thread and on 3."""
    from PIL import Image

    root = _fake_bbbc010(tmp_path / "bbbc", wells=("A01", "A02", "B03"), n=4)
    rng = np.random.default_rng(1)
    masks = root / "masks"
    shape = (24, 32)
    flavours = {
        "A02_05": Image.fromarray(rng.random(shape) > 0.5).convert("1"),
        "A02_06": Image.fromarray((rng.random(shape) > 0.5).astype(np.uint16) * 700),
        "A02_07": Image.fromarray(rng.integers(0, 2, (*shape, 3), dtype=np.uint8) * 255),
        "A02_10": Image.fromarray(rng.integers(0, 2, (*shape, 2), dtype=np.uint8) * 255, "LA"),
    }
    # a palette image: index 0 is white, index 1 black, so pixel values and colours differ
    palette = Image.fromarray(rng.integers(0, 2, shape, dtype=np.uint8), "P")
    palette.putpalette([255, 255, 255, 0, 0, 0] + [0] * 762)
    flavours["B03_05"] = palette
    for name, im in flavours.items():
        im.save(masks / f"{name}_ground_truth.png")
    assert {Image.open(masks / f"{n}_ground_truth.png").mode for n in flavours} >= {
        "1",
        "P",
        "RGB",
        "LA",
    }
    wells = ["A01", "A02", "B03"]
    for with_w1 in (True, False):
        expected = _read_bbbc010_serially(root, wells, with_w1)
        assert expected[1].masks.shape == (8, 24, 32)  # the 10th sorts after the 7th
        for threads in (1, 3):
            got = read_bbbc010(root, with_w1=with_w1, threads=threads)
            assert [s.name for s in got] == wells
            for a, b in zip(got, expected, strict=True):
                assert a.image.dtype == b.image.dtype == np.float32
                np.testing.assert_array_equal(a.image, b.image)
                assert a.masks.dtype == b.masks.dtype == bool
                np.testing.assert_array_equal(a.masks, b.masks)
                assert a.channels.keys() == b.channels.keys()
                for key in a.channels:
                    np.testing.assert_array_equal(a.channels[key], b.channels[key])
    # the palette mask is its colours' first channel, not its indices
    np.testing.assert_array_equal(got[2].masks[4], np.asarray(palette) == 0)
    with pytest.raises(ValueError, match="threads"):
        read_bbbc010(root, threads=0)


def test_threaded_bbbc010_reading_reports_the_first_problem_in_order(tmp_path):
    """With files decoded ahead on threads, the error is still the first well's in order."""
    root = _fake_bbbc010(tmp_path / "bbbc", wells=("A01", "A02", "A03"))
    iio.imwrite(root / "masks" / "A03_04_ground_truth.png", np.zeros((20, 32), np.uint8))
    iio.imwrite(root / "masks" / "A02_04_ground_truth.png", np.zeros((24, 30), np.uint8))
    for threads in (1, 4):
        with pytest.raises(ValueError, match="A02_04_ground_truth.png"):
            read_bbbc010(root, threads=threads)
    (root / "masks" / "A02_04_ground_truth.png").write_bytes(b"not a png")
    for threads in (1, 4):
        with pytest.raises(OSError, match="A02_04|cannot identify"):
            read_bbbc010(root, threads=threads)


@pytest.mark.bbbc010
def test_real_bbbc010_a01(bbbc010_root):
    wells = bbbc010_wells(bbbc010_root)
    assert len(wells) == 50 and wells[0] == "A01" and wells[-1] == "C02"
    (sample,) = read_bbbc010(bbbc010_root, wells=["A01"])
    assert sample.image.shape == (520, 696)
    assert sample.masks.shape == (15, 520, 696)
    assert sample.masks.sum(axis=0).max() > 1  # worms cross: overlaps are kept
    assert sample.masks.reshape(15, -1).any(axis=1).all()  # no empty mask
    assert sample.channels["w1"].shape == (520, 696)
    assert sample.metadata["dataset"] == "BBBC010"
    # bright-field: worms are darker than the background around them
    worms = sample.masks.any(axis=0)
    assert sample.image[worms].mean() < np.median(sample.image[~worms & (sample.image > 1000)])


@pytest.mark.bbbc010
def test_real_bbbc010_reads_tiff_via_read_image(bbbc010_root):
    path = next((bbbc010_root / "images").glob("*_A01_w2_*.tif"))
    out = read_image(path)
    assert out.shape == (1, 1, 520, 696) and out.dtype == np.uint16


def test_read_seed_table(tmp_path):
    from napari_instseg.core.grow import WormSeeds
    from napari_instseg.core.io import read_seed_table

    path = tmp_path / "seeds.csv"
    path.write_text(
        "row,col,worm,positive,note\n10,20,2,1,a\n11.6,20.2,2,true,\n5,6,,,\n30,40,2,0,\n"
    )
    planes = read_seed_table(path)
    assert list(planes) == [0]
    worms = planes[0]
    assert worms[2] == WormSeeds(((10, 20), (12, 20)), ((30, 40),), None)
    (alone,) = [v for k, v in worms.items() if k != 2]
    assert alone == WormSeeds(((5, 6),))
    # napari's Points export; a stack's plane is axis-0
    path.write_text("index,axis-0,axis-1\n0,3.4,4.6\n1,7,8\n")
    found = list(read_seed_table(path)[0].values())
    assert [w.positive for w in found] == [((3, 5),), ((7, 8),)]
    # a worm's own tau: the first one given
    path.write_text("worm,row,col,tau\n1,2,3,0.7\n1,4,5,0.2\n2,6,7,\n")
    assert [w.tau for w in read_seed_table(path)[0].values()] == [0.7, None]
    path.write_text("index,axis-0,axis-1,axis-2\n0,1,3,4\n1,0,7,8\n")
    assert sorted(read_seed_table(path)) == [0, 1]
    for text, message in [
        ("a,b\n1,2\n", "row and col"),
        ("row,col\n1,x\n", "line 2: not a number"),
        ("row,col,positive\n1,2,0\n", "needs a worm"),
        ("row,col,positive\n1,2,maybe\n", "positive must be"),
        ("row,col,worm,positive\n1,2,4,0\n", "only negative"),
        ("row,col,tau\n1,2,1.5\n", "tau must be in"),
    ]:
        path.write_text(text)
        with pytest.raises(ValueError, match=message):
            read_seed_table(path)
    with pytest.raises(FileNotFoundError):
        read_seed_table(tmp_path / "missing.csv")
    path.write_bytes(bytes(range(256)))  # e.g. an image given as the seed table
    with pytest.raises(ValueError, match="seeds.csv is not a CSV text file"):
        read_seed_table(path)
