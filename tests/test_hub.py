"""--model takes a Hugging Face Hub id, resolved through huggingface_hub's cache the way
it lays one out (HF_HOME, offline mode); with no network and no cached copy the error is
one line saying how to point at a local folder. Nothing here reaches the network: every
subprocess runs with HF_HUB_OFFLINE=1."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from agentos import Engine
from agentos.bench.api import free_port
from hf_models import hf_generate, make_hf_checkpoint

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def cache_with(tmp_path, repo: str, folder) -> str:
    """An HF_HOME whose hub cache holds `folder` as repo's main revision, as
    huggingface_hub writes it (blobs, a snapshot of links to them, refs/main)."""
    home = tmp_path / "hf_home"
    root = home / "hub" / ("models--" + repo.replace("/", "--"))
    snap = root / "snapshots" / COMMIT
    snap.mkdir(parents=True)
    (root / "blobs").mkdir()
    for f in folder.iterdir():
        blob = root / "blobs" / f"blob-{f.name}"
        shutil.copy(f, blob)
        os.symlink(os.path.relpath(blob, snap), snap / f.name)
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text(COMMIT)
    return str(home)


def offline(home: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    return {**env, "HF_HOME": home, "HF_HUB_OFFLINE": "1"}


def test_a_hub_id_loads_from_the_cache_offline(tmp_path):
    folder = make_hf_checkpoint(tmp_path / "ckpt", "qwen3", seed=2, with_tokenizer=True)
    home = cache_with(tmp_path, "acme/tiny-qwen3", folder)
    prompt = [0, 5, 9, 17, 33]
    code = ("from agentos import Engine\n"
            "with Engine('acme/tiny-qwen3', kv_blocks=64) as e:\n"
            f"    print(e.create_session(tokens={prompt}).generate(max_tokens=6, "
            "temperature=0.0, ignore_eos=True).tokens)")
    out = subprocess.run([sys.executable, "-c", code], env=offline(home), capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip() == str(hf_generate(folder, prompt, 6))
    # a revision that the cache does not hold is the one-line error
    code = "from agentos import Engine\nEngine('acme/tiny-qwen3', revision='v9')"
    out = subprocess.run([sys.executable, "-c", code], env=offline(home), capture_output=True,
                         text=True, timeout=300)
    assert out.returncode != 0 and "at revision 'v9'" in out.stderr


def test_no_network_and_no_cache_is_one_line(tmp_path):
    out = subprocess.run([sys.executable, "-m", "agentos.cli", "serve", "--port",
                          str(free_port()), "--model", "acme/not-cached"],
                         env=offline(str(tmp_path / "empty")), capture_output=True, text=True,
                         timeout=300)
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2 and len(lines) == 1, out.stderr
    assert "acme/not-cached" in lines[0] and "local checkpoint folder" in lines[0]


def test_paths_that_are_not_hub_ids_keep_the_old_error():
    for bad in ("/nonexistent/model", "./nope", "no-slash"):
        with pytest.raises(FileNotFoundError, match="neither 'tiny'"):
            Engine(bad)
