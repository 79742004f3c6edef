"""Where log records go. At the default verbosity the console shows llama2vec's own messages (INFO and up)
and other libraries' errors only; other libraries' records (their DEBUG and INFO chatter, their warnings and
Python warnings) go to a log file when one is attached (the demo keeps one in its output folder), else their
warnings reach the console. With `--verbose` every record at DEBUG and up reaches the console."""

from __future__ import annotations

import logging
import os
from pathlib import Path

OWN = "llama2vec"
FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_state = {"verbose": False, "files": 0}


def is_own(record: logging.LogRecord) -> bool:
    return record.name == OWN or record.name.startswith(OWN + ".")


class _Console(logging.Filter):
    """Own records at INFO and up; other libraries' at ERROR and up (WARNING while no log file takes them)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if _state["verbose"]:
            return True
        if is_own(record):
            return record.levelno >= logging.INFO
        return record.levelno >= (logging.ERROR if _state["files"] else logging.WARNING)


class _File(logging.Filter):
    """Everything at INFO and up (DEBUG too with --verbose)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return _state["verbose"] or record.levelno >= logging.INFO


def setup_logging(verbose: bool = False) -> None:
    """Configure the root logger for a command line run (called once by the console script)."""
    _state["verbose"] = verbose
    root = logging.getLogger()
    for handler in [h for h in root.handlers if getattr(h, "_llama2vec", False)]:
        root.removeHandler(handler)
    console = logging.StreamHandler()
    console.setFormatter(logging.Formatter(FORMAT, datefmt="%H:%M:%S"))
    console.addFilter(_Console())
    console._llama2vec = True  # type: ignore[attr-defined]
    root.addHandler(console)
    root.setLevel(logging.DEBUG)  # the handlers' filters decide; libraries that set their own level keep it
    logging.captureWarnings(True)  # Python warnings become records of the logger "py.warnings"
    if not verbose:
        # transformers logs through a handler of its own that does not propagate: errors only on the console.
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # transformers' loading and saving bars
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # tensorboard's TensorFlow stub, when installed


def add_log_file(path: Path) -> Path | None:
    """Also write records to `path` (appended); does nothing unless `setup_logging` ran (a command line run).
    Returns the path when attached."""
    root = logging.getLogger()
    if not any(getattr(h, "_llama2vec", False) for h in root.handlers):
        return None
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter(FORMAT, datefmt="%Y-%m-%d %H:%M:%S"))
    handler.addFilter(_File())
    handler._llama2vec = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    _state["files"] += 1
    return path
