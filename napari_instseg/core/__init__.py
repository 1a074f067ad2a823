"""The core: pure numpy/torch code. It never imports napari, Qt, magicgui or vispy."""
