"""`--plot` figures and the progress bars. The figure of every scenario is drawn by its
smoke test in test_bench.py (`--plot`, checked with `assert_png`; `test_bench_without_peer`
also plots a result read back from JSON), so no benchmark runs here twice. Here: the
errors, and the bars on a (fake) terminal."""

from __future__ import annotations

import io
import struct
import sys
from pathlib import Path

import pytest

from agentos.bench import common
from agentos.cli import main

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def assert_png(path: str | Path, min_bytes: int = 10_000) -> None:
    """path holds a PNG of a readable size: the signature, an IHDR of at least 800x400
    pixels, more than min_bytes bytes (an empty figure is a few kB)."""
    data = Path(path).read_bytes()
    assert data[:8] == PNG_SIGNATURE, f"{path} is not a PNG"
    assert data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    assert width >= 800 and height >= 400, (width, height)
    assert len(data) > min_bytes, f"{path}: {len(data)} bytes"


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


FORK_NO_PEER = ["bench", "fork", "--lengths", "32,48", "--fanout-len", "32", "--fanout", "2",
                "--repeats", "1", "--warmup", "0", "--no-peer"]


def test_plot_unknown_bench(tmp_path):
    from agentos.bench.plot import plot

    with pytest.raises(ValueError, match="no plot for benchmark 'nope'"):
        plot({"bench": "nope"}, tmp_path / "x.png")


def test_plot_without_matplotlib_exits_before_the_run(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises
    with pytest.raises(SystemExit) as e:
        main([*FORK_NO_PEER, "--json", str(tmp_path / "f.json"), "--plot", str(tmp_path / "f.png")])
    assert e.value.code == 2
    assert "pip install" in capsys.readouterr().err
    assert not (tmp_path / "f.json").exists()  # the benchmark did not run


def test_progress_is_silent_off_a_terminal(capsys):
    with common.progress(3, "runs") as advance:
        for _ in range(3):
            advance()
    assert capsys.readouterr() == ("", "")


def test_progress_on_a_terminal_nests(monkeypatch):
    """On a terminal the bar is drawn on stderr; a progress() inside another (bench gpu
    runs bench decode) adds a line to the bar on screen; both are gone afterwards."""
    term = FakeTerminal()
    monkeypatch.setattr(sys, "stderr", term)
    with common.progress(2, "outer runs") as outer:
        with common.progress(3, "inner runs") as inner:
            for _ in range(3):
                inner()
        outer(2)
    assert common._bar is None and sys.stderr is term
    drawn = term.getvalue()
    assert "outer runs" in drawn and "inner runs" in drawn


def test_loader_progress_on_a_terminal(tmp_path, monkeypatch):
    """Loading a HF folder on a terminal draws a bar over its bytes; under a benchmark's
    bar it draws none (one live display at a time). The weights are the same."""
    import torch

    from agentos.kernel.runner.loader import load_model, save_hf_folder, tiny_hf_config, tiny_hf_weights

    folder = save_hf_folder(tmp_path / "tiny-hf", tiny_hf_config(), tiny_hf_weights())
    plain, _, _ = load_model(str(folder))
    term = FakeTerminal()
    monkeypatch.setattr(sys, "stderr", term)
    net, _, _ = load_model(str(folder))
    assert "loading tiny-hf" in term.getvalue()
    for (name, a), (_, b) in zip(plain.state_dict().items(), net.state_dict().items()):
        assert torch.equal(a, b), name
    term.seek(0)
    term.truncate()
    with common.progress(1, "bench runs") as advance:
        load_model(str(folder))
        advance()
    assert "bench runs" in term.getvalue() and "loading" not in term.getvalue()
