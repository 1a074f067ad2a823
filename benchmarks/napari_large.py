"""Latency of the napari plugin on a large image: a mosaic of BBBC010 bright-field images.

Builds an n x n mosaic (``--tiles 4``: 2080 x 2784; ``--tiles 8``: 4160 x 5568) of the
first 16 BBBC010 wells (``np.block`` of ``read_bbbc010(..., with_w1=False)[k].image``),
opens it in ``napari.Viewer(show=True)`` with the widget docked, runs the shipped model
(blocking), then times, until the canvas has drawn (``napari_latency.Redraw``): clicks on
worms (the worms of the top-left 4 x 4 tiles, each undone after timing), undo, tau slider
steps on a worm grown from the embeddings, the live similarity-to-cursor preview, and
**Segment all**. Peak RSS from ``resource.getrusage``. Needs a display::

    OMP_NUM_THREADS=1 taskset -c 0 xvfb-run -a -s "-screen 0 1600x1000x24" \
        .venv/bin/python benchmarks/napari_large.py --data /path/to/bbbc010 --tiles 4

``--profile FILE`` writes a cProfile of the timed interactions (and prints its top).
"""

import argparse
import cProfile
import pstats
import resource
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from napari_latency import Redraw, inner_pixel, send_click, settle  # noqa: E402


def rss_mb():
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def peak_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def mosaic(root, n):
    from napari_instseg.core.io import bbbc010_wells, read_bbbc010

    wells = bbbc010_wells(root)[:16]
    samples = read_bbbc010(root, wells=wells, with_w1=False)
    h, w = samples[0].image.shape
    rows = []
    points = []
    for i in range(n):
        row = []
        for j in range(n):
            s = samples[(i * n + j) % len(samples)]
            row.append(s.image)
            if i < 4 and j < 4 and len(points) < 40:
                for k in range(0, len(s.masks), 3):
                    r, c = inner_pixel(s.masks, k)
                    points.append((r + i * h, c + j * w))
        rows.append(row)
    return np.block(rows).astype(np.float32), points


def med(a):
    p90 = np.percentile(a, 90)
    return f"median {np.median(a):.1f} ms p90 {p90:.1f} max {np.max(a):.1f} (n={len(a)})"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True, help="BBBC010 folder (images/, masks/)")
    ap.add_argument("--tiles", type=int, default=4)
    ap.add_argument("--clicks", type=int, default=12)
    ap.add_argument("--profile", default="")
    ap.add_argument("--skip-segment", action="store_true")
    ap.add_argument(
        "--profile-segment", default="", help="cProfile of Segment all alone to this file"
    )
    args = ap.parse_args()
    import napari

    from napari_instseg._napari.widget import InstSegWidget

    image, points = mosaic(args.data, args.tiles)
    print("image", image.shape, "rss", round(rss_mb()), "MB", flush=True)
    viewer = napari.Viewer(show=True)
    viewer.add_image(image, name="big")
    widget = InstSegWidget(viewer)
    viewer.window.add_dock_widget(widget, name="instseg")
    settle(20)
    redraw = Redraw(viewer)
    redraw.wait()
    r0 = rss_mb()
    t0 = time.perf_counter()
    widget.run_model(blocking=True)
    settle(20)
    redraw.wait()
    t_run = time.perf_counter() - t0
    print(
        f"run model (blocking, incl. layers shown): {t_run:.1f} s; "
        f"rss {r0:.0f} -> {rss_mb():.0f} MB, peak {peak_mb():.0f} MB",
        flush=True,
    )
    session = widget.session()
    widget.set_tool("new")
    prof = cProfile.Profile() if args.profile else None

    # first click (may compute automatic segments)
    settle()
    r, c = points[0]
    t0 = time.perf_counter()
    send_click(viewer, r, c)
    t1 = time.perf_counter()
    redraw.wait()
    t2 = time.perf_counter()
    print(
        f"first click: data {1000 * (t1 - t0):.0f} ms, drawn {1000 * (t2 - t0):.0f} ms; "
        f"rss {rss_mb():.0f} MB",
        flush=True,
    )
    t0 = time.perf_counter()
    widget.undo()
    redraw.wait()
    print(f"first undo drawn {1000 * (time.perf_counter() - t0):.0f} ms", flush=True)

    data, drawn, undo_t = [], [], []
    for k in range(args.clicks):
        r, c = points[(k + 1) % len(points)]
        n = len(session.worms)
        settle()
        if prof:
            prof.enable()
        t0 = time.perf_counter()
        send_click(viewer, r, c)
        t1 = time.perf_counter()
        redraw.wait()
        t2 = time.perf_counter()
        if prof:
            prof.disable()
        if len(session.worms) != n + 1:
            print("click did not grow at", (r, c), widget.status.text())
            continue
        data.append(1000 * (t1 - t0))
        drawn.append(1000 * (t2 - t0))
        settle()
        t0 = time.perf_counter()
        widget.undo()
        redraw.wait()
        undo_t.append(1000 * (time.perf_counter() - t0))
    print("click -> data:", med(data))
    print("click -> drawn:", med(drawn))
    print("undo -> drawn:", med(undo_t), flush=True)

    # tau slider
    widget.click_segments.setChecked(False)
    r, c = points[1]
    t0 = time.perf_counter()
    send_click(viewer, r, c)
    redraw.wait()
    print(f"embedding click drawn {1000 * (time.perf_counter() - t0):.0f} ms", flush=True)
    taus = []
    sweep = list(range(30, 91, 4)) + list(range(86, 31, -4))
    for i, tau in enumerate(sweep):
        settle(2)
        if prof and i:
            prof.enable()
        t0 = time.perf_counter()
        widget.set_tau(tau / 100, live=True)
        redraw.wait()
        if prof and i:
            prof.disable()
        if i:
            taus.append(1000 * (time.perf_counter() - t0))
    widget.end_tau_drag()
    print("tau step -> drawn:", med(taus), flush=True)
    t0 = time.perf_counter()
    widget.undo()
    widget.undo()
    redraw.wait()
    print(f"two undos drawn {1000 * (time.perf_counter() - t0):.0f} ms", flush=True)
    widget.click_segments.setChecked(True)

    # similarity preview
    widget.hover_check.setChecked(True)
    settle(5)
    redraw.wait()
    sims = []
    for k in range(8):
        r, c = points[k % len(points)]
        settle(2)
        if prof:
            prof.enable()
        t0 = time.perf_counter()
        session.similarity_to((r, c))
        redraw.wait()
        if prof:
            prof.disable()
        sims.append(1000 * (time.perf_counter() - t0))
    print("similarity preview -> drawn:", med(sims), flush=True)
    widget.hover_check.setChecked(False)
    settle(5)

    if not args.skip_segment:
        seg_prof = cProfile.Profile() if args.profile_segment else None
        if seg_prof:
            seg_prof.enable()
        t0 = time.perf_counter()
        n = widget.segment(blocking=True)
        redraw.wait()
        print(f"segment all: {n} worms, {time.perf_counter() - t0:.1f} s", flush=True)
        if seg_prof:
            seg_prof.disable()
            seg_prof.dump_stats(args.profile_segment)
            pstats.Stats(seg_prof).sort_stats("cumulative").print_stats(30)
        t0 = time.perf_counter()
        widget.undo()
        redraw.wait()
        print(f"undo segment all drawn {1000 * (time.perf_counter() - t0):.0f} ms", flush=True)
    print(f"peak RSS {peak_mb():.0f} MB", flush=True)
    if prof:
        prof.dump_stats(args.profile)
        pstats.Stats(prof).sort_stats("cumulative").print_stats(45)
    viewer.close()


if __name__ == "__main__":
    main()
