"""The command-line dispatcher: errors become one ``napari-instseg <cmd>: error:`` line."""

import pytest

from napari_instseg.cli import main


@pytest.mark.parametrize(
    "error",
    [
        FileNotFoundError("no such file: x.tif"),
        FileExistsError("models/tiny-ft1 exists"),
        NotADirectoryError("--out file.zarr exists and is not a folder"),
        IsADirectoryError(21, "Is a directory", "somedir"),
        PermissionError(13, "Permission denied", "locked.tif"),
        ValueError("tau must be in (0, 1)"),
    ],
)
def test_errors_are_one_line_on_stderr_and_status_1(monkeypatch, capsys, error):
    import napari_instseg.cli.evaluate as command

    def fail(args):
        raise error

    monkeypatch.setattr(command, "run", fail)
    assert main(["evaluate", "--pred", "p", "--gt", "g"]) == 1
    captured = capsys.readouterr()
    assert captured.err == f"napari-instseg evaluate: error: {error}\n"
    assert not captured.out


@pytest.mark.parametrize("command", ["predict", "grow", "evaluate"])
def test_help_mentions_only_options_the_command_has(capsys, command):
    with pytest.raises(SystemExit):
        main([command, "--help"])
    text = " ".join(capsys.readouterr().out.split())
    # --scale auto's batch-wide estimate needs --out *.zarr, which only predict has
    assert ("--out *.zarr" in text) == (command == "predict")
    if command == "grow":  # the embedding-only flags say so
        assert "no effect when worms start from the segments" in text


def test_ctrl_c_is_one_line_and_status_130(monkeypatch, capsys):
    import napari_instseg.cli.evaluate as command

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(command, "run", interrupted)
    assert main(["evaluate", "--pred", "p", "--gt", "g"]) == 130
    assert capsys.readouterr().err == "napari-instseg evaluate: interrupted\n"
