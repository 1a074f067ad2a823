"""The napari side of napari-instseg: dock widget, reader, writer and sample data.

Everything here is a thin layer over :mod:`napari_instseg.core`: it turns user actions
into core calls and core results into napari layers. Only this package imports napari,
Qt (through qtpy) and magicgui.
"""
