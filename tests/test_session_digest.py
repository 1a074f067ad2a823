"""The label image's digest (``session.state_key``) updated edit by edit equals a full one."""

import numpy as np

from napari_instseg._napari.session import pixel_sum, state_key, updated_key


def test_updated_key_equals_the_key_of_the_whole_edited_image():
    rng = np.random.default_rng(3)
    labels = np.zeros((37, 53), np.uint16)
    labels[5:20, 7:30] = 3
    key = state_key(labels)
    seen = {key}
    for step in range(60):
        n = int(rng.integers(1, 40))
        flat = rng.choice(labels.size, n, replace=False)
        new = rng.integers(0, 5, n).astype(labels.dtype)  # 0: pixels erased too
        old = labels.reshape(-1)[flat].copy()
        labels.reshape(-1)[flat] = new
        key = updated_key(key, flat, old, new)
        assert key == state_key(labels), step
        seen.add(key)
    # undoing every edit in reverse gives the first key back: a sum, not a sequence
    assert state_key(np.zeros((37, 53), np.uint16)) == ((37, 53), "<u2", 0)
    assert len(seen) > 50


def test_state_key_tells_apart_labels_positions_shapes_and_dtypes():
    a = np.zeros((8, 9), np.int32)
    a[2, 3] = 1
    b = np.zeros((8, 9), np.int32)
    b[3, 2] = 1  # same label, another pixel
    c = a.copy()
    c[2, 3] = 2  # same pixel, another label
    keys = [state_key(x) for x in (a, b, c, a.astype(np.uint16), a.reshape(9, 8))]
    assert len(set(keys)) == len(keys)
    assert state_key(a) == state_key(a.copy())
    assert pixel_sum(np.arange(4), np.zeros(4, np.int32)) == 0
