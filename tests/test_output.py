"""What a command prints: its own messages at the default verbosity; other libraries' records in the log file,
or on the console with --verbose."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np

from llama2vec.embeddings import save_embeddings

ENV = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def index(tmp_path, name: str, *flags: str) -> subprocess.CompletedProcess:
    """`llama2vec index` on 40 vectors: it imports FAISS, whose loader logs INFO lines when it starts."""
    emb = tmp_path / "emb"
    if not emb.exists():
        x = np.random.default_rng(0).standard_normal((40, 8)).astype(np.float32)
        save_embeddings(emb, [f"p{i}" for i in range(40)], x / np.linalg.norm(x, axis=1, keepdims=True),
                        {"fingerprint": {"made": "by test_output"}})
    done = subprocess.run([sys.executable, "-m", "llama2vec", *flags, "index", "--embeddings", str(emb),
                           "--output", str(tmp_path / name), "--factory", "Flat"],
                          capture_output=True, text=True, timeout=300, env=ENV)
    assert done.returncode == 0, done.stderr[-2000:]
    return done


def foreign_lines(text: str) -> list[str]:
    """Log lines ('HH:MM:SS LEVEL name: ...') from a logger that is not llama2vec's."""
    out = []
    for line in text.splitlines():
        parts = line.split(" ", 3)
        if len(parts) == 4 and parts[1] in ("DEBUG", "INFO", "WARNING", "ERROR") and not parts[2].startswith(
                "llama2vec"):
            out.append(line)
    return out


def test_library_chatter_goes_to_the_log_file_or_to_verbose(tmp_path):
    quiet = index(tmp_path, "quiet")
    assert foreign_lines(quiet.stderr + quiet.stdout) == [], quiet.stderr
    assert "faiss" not in quiet.stderr
    assert "indexed " in quiet.stdout  # its own report still comes

    log = tmp_path / "run.log"
    logged = index(tmp_path, "logged", "--log-file", str(log))
    assert foreign_lines(logged.stderr) == [], logged.stderr
    assert "INFO faiss.loader: " in log.read_text()  # kept, in the file

    verbose = index(tmp_path, "verbose", "--verbose")
    assert any(" faiss.loader: " in line for line in foreign_lines(verbose.stderr))
