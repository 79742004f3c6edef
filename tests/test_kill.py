"""Kill -9: SIGKILL at seeded random moments, then the same command again, gives the uninterrupted result.

Each command (`adapt`, `finetune`, `encode`, `index`, `demo --preset quick`, on a tiny model) runs as
`python -m llama2vec ...` in a subprocess. First once uninterrupted: the reference, which also times its first and
last writes into its output folder (the imports and the model loading come before the first). Then as a chain on
a fresh output folder: start, SIGKILL (`os.kill`, not an exception) at a moment drawn by `random.Random(seed)`,
start the same command (same arguments) again, kill again, ..., and a last uninterrupted run. The result must
equal the reference: every weight within 1e-6 and the same losses at every step, none missing or repeated (adapt,
finetune); the same ids and embeddings, no row lost or duplicated (encode); the same ids, vectors and search
results (index); the same metrics (demo); and no temporary file left.

Kill moments: a chain of k kills draws stratified fractions f_1 < ... < f_k of the reference's window W (first to
last write), f_j uniform in the j-th of k equal slices of [0, 0.95]. Run j is killed (f_j - p) * W after its own
first write, p being the share of the work that the folder already held (complete checkpoints, shards, demo
stages; 0 for `index`, which writes everything again), and W scaled by how much slower or faster than the
reference this run reached its first write (the machine's load). The demo counts from its start instead (a
resumed demo writes nothing before the stage it resumes). A kill counts only when it hit a running process (exit
status -9); a run that ended first closes its chain, and a fresh chain takes the kills still wanted. The demo's
reference and chain run in a background thread while the other commands' chains run; the last test checks that
at least 14 kills hit across the five commands. Each command's log (in the test's temporary folder) shows what
every kill left behind.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from conftest import SENTENCES, make_model, make_tokenizer

# make test-fast leaves these out; under pytest-xdist one worker runs them all (--dist loadscope): the demo's
# chain runs in the background while the other commands' chains run, and the last test counts every kill.
pytestmark = pytest.mark.slow
KILLS: dict[str, int] = {}  # command -> kills that hit a running process
MOMENTS: dict[str, list[float]] = {}  # command -> seconds after the first write (demo: after the start) of each hit
WANTED = {"adapt": 4, "finetune": 4, "encode": 3, "index": 2, "demo": 3}
AT_LEAST = {**WANTED, "demo": 2}  # the demo is not restarted on a fresh folder when a kill comes too late
TOTAL_AT_LEAST = 14
TEMP_MARKS = (".tmp-", "tmp-checkpoint", "deleting-checkpoint")
POLL_S = 0.005
STARTED: list[subprocess.Popen] = []  # every process started here: none may outlive the tests
STOP = threading.Event()  # set when the tests end: the demo's thread starts nothing more
TEXTS, SHARD = 2000, 25  # encode: 80 shards


# ---------------------------------------------------------------------------------------------- running


def tree_stamp(folder: Path) -> tuple[int, int]:
    """(files, newest modification time in ns) of the files under `folder`: writing, replacing or removing a file
    changes it. Folders do not count: the commands make their output folder before their heavy imports."""
    count, newest = 0, 0
    for root, _, files in os.walk(folder):
        for name in files:
            try:
                newest = max(newest, os.stat(os.path.join(root, name)).st_mtime_ns)
                count += 1
            except FileNotFoundError:  # removed while walking
                pass
    return count, newest


@dataclass
class Command:
    """One llama2vec command line, `args(output)`, run in `root`; every run appends its output to a log file."""

    name: str
    root: Path
    args: Callable[[Path], list[str]]
    env: dict[str, str] = field(default_factory=dict)

    @property
    def log(self) -> Path:
        return self.root / f"{self.name}.log"

    def start(self, out: Path, what: str) -> tuple[subprocess.Popen, int]:
        """The started process and the offset of its output in the log."""
        if STOP.is_set():
            raise RuntimeError("the kill tests are over")
        with self.log.open("a") as fh:
            fh.write(f"\n===== {what}: {out.name}\n")
            offset = fh.tell()
            proc = subprocess.Popen([sys.executable, "-m", "llama2vec", *self.args(out)], cwd=self.root, env=self.env,
                                    stdin=subprocess.DEVNULL, stdout=fh, stderr=subprocess.STDOUT)
        STARTED.append(proc)
        return proc, offset

    def output_since(self, offset: int) -> str:
        with self.log.open(errors="replace") as fh:
            fh.seek(offset)
            return fh.read()[-4000:]

    def check_exit(self, proc: subprocess.Popen, offset: int, out: Path) -> None:
        assert proc.returncode == 0, (f"{self.name} on {out.name} failed (exit status {proc.returncode}):\n"
                                      f"{self.output_since(offset)}")


@dataclass
class Reference:
    output: Path
    first_write_s: float  # from the start to the first file written into the output folder
    last_write_s: float  # ... and to the last (the interpreter's exit comes after)
    total_s: float

    @property
    def window_s(self) -> float:
        return max(self.last_write_s - self.first_write_s, 0.05)


def run_reference(cmd: Command, out: Path, poll_s: float = POLL_S) -> Reference:
    """Run uninterrupted on a fresh folder, timing its first and last writes into it and its end."""
    stamp = tree_stamp(out)
    t0 = time.monotonic()
    proc, offset = cmd.start(out, "reference")
    first = last = None
    while proc.poll() is None:
        now = tree_stamp(out)
        if now != stamp:
            stamp, last = now, time.monotonic() - t0
            first = last if first is None else first
        time.sleep(poll_s)
    total = time.monotonic() - t0
    cmd.check_exit(proc, offset, out)
    if tree_stamp(out) != stamp:  # written after the last look
        first, last = total if first is None else first, total
    assert first is not None and last is not None, f"{cmd.name} wrote nothing into {out}"
    with cmd.log.open("a") as fh:
        fh.write(f"\n===== reference timing: first write {first:.3f} s, last {last:.3f} s, end {total:.3f} s\n")
    return Reference(out, first, last, total)


def run_to_end(cmd: Command, out: Path) -> None:
    proc, offset = cmd.start(out, "rerun, uninterrupted")
    proc.wait()
    cmd.check_exit(proc, offset, out)


def run_killed(cmd: Command, out: Path, delay_s: float,
               ref_first_write_s: float | None = None) -> tuple[float | None, float, float]:
    """Start the command on `out` and SIGKILL it `delay_s` after its start, or, given the reference's time to its
    first write, `delay_s` after this run's first write into `out`, scaled by how much slower or faster this run
    got there (the machine's load changes the pace of the whole run). Returns (the seconds from that point to the
    kill when it hit the running process, None when the run had ended uninterrupted first; the seconds from that
    point to the end; the scale applied)."""
    before = tree_stamp(out)
    point = "start" if ref_first_write_s is None else "first write"
    proc, offset = cmd.start(out, f"aiming {delay_s:.3f} s after the {point}, before scaling")
    t0, scale = time.monotonic(), 1.0
    if ref_first_write_s is not None:
        while proc.poll() is None and tree_stamp(out) == before:
            time.sleep(POLL_S)
        now = time.monotonic()
        scale = min(3.0, max(1 / 3, (now - t0) / ref_first_write_s))
        delay_s *= scale
        t0 = now
    try:
        proc.wait(timeout=max(0.0, t0 + delay_s - time.monotonic()))
    except subprocess.TimeoutExpired:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    if proc.returncode == -signal.SIGKILL:
        at = time.monotonic() - t0
        left = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()) if out.is_dir() else []
        with cmd.log.open("a") as fh:
            fh.write(f"\n===== SIGKILL {at:.3f} s after the {point} (aimed at {delay_s:.3f} s), leaving {left}\n")
        return at, at, scale
    cmd.check_exit(proc, offset, out)  # a rerun must not fail on what a killed run left
    return None, time.monotonic() - t0, scale


def stratified_fractions(rng: random.Random, k: int, top: float = 0.95) -> list[float]:
    """f_1 < ... < f_k, f_j uniform in the j-th of k equal slices of [0, top]."""
    return [top * (j + rng.uniform(0.05, 0.95)) / k for j in range(k)]


def kill_chains(cmd: Command, ref: Reference, rng: random.Random, wanted: int, progress: Callable[[Path], float],
                from_start: bool = False, max_chains: int = 6, top: float = 0.95) -> list[Path]:
    """Kill -> rerun chains until `wanted` kills hit, each chain closed by an uninterrupted run; returns their
    output folders. Run j of a chain aims at the moment f_j (`stratified_fractions`) of the reference's window,
    less the share of the work that the folder already holds (`progress`, measured before the run): it is
    killed (f_j - progress) * window after its first write (see `run_killed`), or with `from_start`, after its
    start plus the reference's time to its first write. A run that ends before its kill times the rest: the
    machine's load may have changed since the reference, so later aims follow the pace that run kept."""
    hits, moments, folders = 0, MOMENTS.setdefault(cmd.name, []), []
    pace = 1.0  # seconds of work now per second of the reference's, beyond what the first write's timing shows
    while hits < wanted and len(folders) < max_chains:
        out = cmd.root / f"{cmd.name}-chain{len(folders)}"
        folders.append(out)
        ended = False
        for f in stratified_fractions(rng, wanted - hits, top):
            done = progress(out)
            delay = max(0.0, f - done) * ref.window_s * pace
            if from_start:
                at, _, _ = run_killed(cmd, out, ref.first_write_s + delay)
            else:
                at, span, scale = run_killed(cmd, out, delay, ref.first_write_s)
                if at is None:
                    expected = (ref.total_s - ref.first_write_s) * max(1.0 - done, 0.05) * scale
                    pace = min(3.0, max(0.1, span / expected))
                    with cmd.log.open("a") as fh:
                        fh.write(f"\n===== ended {span:.3f} s after the first write: pace {pace:.3f}\n")
            if at is None:
                ended = True  # this folder is finished: its remaining kills go to a fresh chain
                break
            hits += 1
            moments.append(round(at, 3))
        if not ended:
            run_to_end(cmd, out)
        KILLS[cmd.name] = hits
    return folders


def training_progress(steps: int) -> Callable[[Path], float]:
    def progress(out: Path) -> float:
        done = [int(p.name.split("-")[1]) for p in out.glob("checkpoints/checkpoint-*") if (p / "state.json").is_file()]
        return max(done, default=0) / steps

    return progress


def demo_progress(ref: Path) -> Callable[[Path], float]:
    """The share of the reference's time that the stages finished in a demo folder took."""
    took = json.loads((ref / "report.json").read_text())["timings"]

    def progress(out: Path) -> float:
        if (out / "report.json").is_file():
            return 1.0
        done = {"data": (out / "data" / "dev" / "qrels" / "test.tsv").is_file(),
                "adapt": (out / "adapted" / "llama2vec_config.json").is_file(),
                "choose_encoding": (out / "eval" / "encoding_dev.json").is_file(),
                "finetune": len(list(out.glob("finetuned/*/*/llama2vec_config.json"))) / 2,
                "evaluate": (len(list(out.glob("eval/**/*.json"))) - 1) / 14}  # 6 systems' metrics, 2 sets
        return sum(took.get(stage, 0.0) * max(0.0, float(share)) for stage, share in done.items()) / sum(took.values())

    return progress


def encode_progress(shards: int) -> Callable[[Path], float]:
    def progress(out: Path) -> float:
        return 1.0 if (out / "meta.json").is_file() else len(list(out.glob("shards/shard-*.json"))) / shards

    return progress


def seeded(name: str) -> random.Random:
    return random.Random(zlib.crc32(f"kill-9:{name}".encode()))


# ---------------------------------------------------------------------------------------------- checks


def assert_no_temporaries(folder: Path) -> None:
    left = [str(p.relative_to(folder)) for p in folder.rglob("*") if any(m in p.name for m in TEMP_MARKS)]
    assert not left, f"{folder.name}: temporaries left after the last run: {left}"


def log_records(folder: Path) -> list[dict]:
    """log.jsonl without the throughput (a timing)."""
    rows = [json.loads(line) for line in (folder / "log.jsonl").read_text().splitlines() if line.strip()]
    return [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in rows]


def assert_same_training(ref: Path, got: Path, steps: int) -> None:
    from safetensors.torch import load_file

    assert (got / "llama2vec_config.json").is_file(), f"{got.name}: no finished model folder"
    want, have = load_file(ref / "model.safetensors"), load_file(got / "model.safetensors")
    assert sorted(want) == sorted(have)
    for name, tensor in want.items():
        assert have[name].shape == tensor.shape and have[name].dtype == tensor.dtype, name
        diff = (have[name].double() - tensor.double()).abs().max().item() if tensor.numel() else 0.0
        assert diff <= 1e-6, f"{got.name}: {name} differs by {diff:g}"
    records = log_records(got)
    assert [r["step"] for r in records] == list(range(1, steps + 1)), f"{got.name}: log steps lost or repeated"
    assert records == log_records(ref), f"{got.name}: other losses than the uninterrupted run"
    for name in ("llama2vec_config.json", "config.json"):
        assert json.loads((got / name).read_text()) == json.loads((ref / name).read_text()), name
    assert [p.name for p in (got / "checkpoints").iterdir()] and all(
        p.name.startswith("checkpoint-") for p in (got / "checkpoints").iterdir())
    assert_no_temporaries(got)


def assert_same_embeddings(ref: Path, got: Path, n: int) -> None:
    from llama2vec.embeddings import load_embeddings

    ids, emb = load_embeddings(got)
    assert len(ids) == len(set(ids)) == n, f"{got.name}: ids lost or repeated"
    want_ids, want = load_embeddings(ref)
    assert ids == want_ids and emb.shape[0] == n and np.array_equal(emb, want), f"{got.name}: other embeddings"
    assert json.loads((got / "meta.json").read_text()) == json.loads((ref / "meta.json").read_text())
    assert sorted(p.name for p in (got / "shards").iterdir()) == sorted(p.name for p in (ref / "shards").iterdir())
    assert_no_temporaries(got)


def assert_same_index(ref: Path, got: Path, queries: np.ndarray) -> None:
    import faiss

    ids = (got / "ids.txt").read_text().splitlines()
    assert len(ids) == len(set(ids)) and ids == (ref / "ids.txt").read_text().splitlines()
    want, have = faiss.read_index(str(ref / "index.faiss")), faiss.read_index(str(got / "index.faiss"))
    assert have.ntotal == want.ntotal == len(ids)
    assert np.array_equal(have.reconstruct_n(0, have.ntotal), want.reconstruct_n(0, want.ntotal))
    for a, b in zip(have.search(queries, 10), want.search(queries, 10)):
        assert np.array_equal(a, b), f"{got.name}: other search results"
    assert json.loads((got / "meta.json").read_text()) == json.loads((ref / "meta.json").read_text())
    assert_no_temporaries(got)


def demo_figures(folder: Path) -> dict:
    report = json.loads((folder / "report.json").read_text())
    return {"systems": {k: {m: v for m, v in e.items() if m != "model"} for k, e in report["systems"].items()},
            "label_curve": report["label_curve"], "encoding_choice": report["settings"]["encoding_choice"],
            "out_of_domain": report["out_of_domain"]}


# ---------------------------------------------------------------------------------------------- inputs


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    """A folder with the tiny model and the inputs of every command."""
    root = tmp_path_factory.mktemp("kill9")
    tok = make_tokenizer()
    make_model(len(tok)).save_pretrained(root / "tiny")
    tok.save_pretrained(root / "tiny")
    rng = random.Random(0)
    words = " ".join(SENTENCES).split()

    def text(n: int) -> str:
        return " ".join(rng.choice(words) for _ in range(n))

    with (root / "corpus.jsonl").open("w") as fh:  # 210 (text, next text) pairs of 32-token chunks
        for d in range(30):
            fh.write(json.dumps({"id": f"d{d}", "title": f"Doc {d}",
                                 "text": " ".join(SENTENCES[(d + i) % len(SENTENCES)] for i in range(8))}) + "\n")
    with (root / "train.jsonl").open("w") as fh:
        for _ in range(120):
            fh.write(json.dumps({"query": text(6), "pos": [text(20)], "neg": [text(20) for _ in range(3)]}) + "\n")
    with (root / "texts.jsonl").open("w") as fh:
        for i in range(TEXTS):
            fh.write(json.dumps({"_id": f"t{i}", "text": text(rng.randint(2, 30))}) + "\n")
    return root


def command(work: Path, name: str, args: Callable[[Path], list[str]]) -> Command:
    env = {**os.environ, "PYTHONHASHSEED": "0", "CUDA_VISIBLE_DEVICES": "", "TOKENIZERS_PARALLELISM": "false",
           "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "LLAMA2VEC_CACHE": str(work / "cache"),
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    return Command(name, work, args, env)


def demo_command(work: Path) -> Command:
    return command(work, "demo", lambda out: ["demo", "--preset", "quick", "--output", str(out),
                                              "--model", str(work / "tiny")])


class Background:
    """The demo's reference and kill chain, in a thread, while the other commands' chains run."""

    def __init__(self, work: Path):
        self.cmd, self.result, self.error = demo_command(work), None, None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            ref = run_reference(self.cmd, self.cmd.root / "demo-reference", poll_s=0.05)
            # From the start: a rerun writes nothing before the stage it resumes. One chain (a fresh one would cost
            # a whole demo): a rerun first starts again and redoes the stage that the kill cut, so it lags behind
            # its aim and its kill comes before the end.
            folders = kill_chains(self.cmd, ref, seeded("demo"), WANTED["demo"], demo_progress(ref.output),
                                  from_start=True, max_chains=1, top=0.85)
            self.result = (ref, folders)
        except BaseException as e:  # re-raised in the demo test
            self.error = e

    def get(self):
        self.thread.join()
        if self.error is not None:
            raise self.error
        return self.result


@pytest.fixture(scope="module", autouse=True)
def demo_run(request, work):
    """Starts the demo's runs at the module's first test when the demo test is selected. Afterwards, kills what a
    failed or interrupted test left running (by pid)."""
    selected = any(item.name == "test_kill_demo" for item in request.session.items)
    background = Background(work) if selected else None
    yield background
    STOP.set()
    for proc in STARTED:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if background is not None:
        background.thread.join()


# ---------------------------------------------------------------------------------------------- tests


def test_kill_adapt(work):
    steps = 120  # 53 batches an epoch: the run crosses two epoch boundaries
    cmd = command(work, "adapt", lambda out: [
        "adapt", "--model", str(work / "tiny"), "--corpus", str(work / "corpus.jsonl"), "--output", str(out),
        "--max-length", "32", "--batch-size", "4", "--max-steps", str(steps), "--warmup-steps", "5",
        "--save-steps", "5", "--logging-steps", "1", "--device", "cpu", "--resume"])
    ref = run_reference(cmd, work / "adapt-reference")
    for out in kill_chains(cmd, ref, seeded("adapt"), WANTED["adapt"], training_progress(steps)):
        assert_same_training(ref.output, out, steps)
    assert KILLS["adapt"] >= AT_LEAST["adapt"], MOMENTS["adapt"]


def test_kill_finetune(work):
    steps = 40  # 30 batches an epoch; LoRA with dropout: the resumed random state matters
    cmd = command(work, "finetune", lambda out: [
        "finetune", "--model", str(work / "tiny"), "--train", str(work / "train.jsonl"), "--output", str(out),
        "--group-size", "4", "--query-max-length", "16", "--passage-max-length", "32", "--batch-size", "4",
        "--max-steps", str(steps), "--warmup-steps", "4", "--save-steps", "3", "--logging-steps", "1",
        "--device", "cpu", "--resume"])
    ref = run_reference(cmd, work / "finetune-reference")
    for out in kill_chains(cmd, ref, seeded("finetune"), WANTED["finetune"], training_progress(steps)):
        assert_same_training(ref.output, out, steps)
    assert KILLS["finetune"] >= AT_LEAST["finetune"], MOMENTS["finetune"]


def test_kill_encode(work):
    cmd = command(work, "encode", lambda out: [
        "encode", "--model", str(work / "tiny"), "--input", str(work / "texts.jsonl"), "--output", str(out),
        "--shard-size", str(SHARD), "--batch-size", "8", "--device", "cpu"])
    ref = run_reference(cmd, work / "encode-reference")
    for out in kill_chains(cmd, ref, seeded("encode"), WANTED["encode"], encode_progress(-(-TEXTS // SHARD))):
        assert_same_embeddings(ref.output, out, TEXTS)
    assert KILLS["encode"] >= AT_LEAST["encode"], MOMENTS["encode"]


def test_kill_index(work):
    from llama2vec.embeddings import save_embeddings

    rng = np.random.default_rng(0)
    emb = rng.standard_normal((250_000, 64)).astype(np.float32)  # 64 MB: writing it takes a while
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    source = work / "index-embeddings"
    source.mkdir()
    save_embeddings(source, [f"p{i}" for i in range(len(emb))], emb, {"fingerprint": {"made": "by test_kill"}})
    cmd = command(work, "index", lambda out: ["index", "--embeddings", str(source), "--output", str(out),
                                              "--factory", "Flat"])
    ref = run_reference(cmd, work / "index-reference")
    # Not resumable: every run writes the whole folder again (its progress is always 0).
    for out in kill_chains(cmd, ref, seeded("index"), WANTED["index"], lambda out: 0.0):
        assert_same_index(ref.output, out, emb[:50])
    assert KILLS["index"] >= AT_LEAST["index"], MOMENTS["index"]


@pytest.mark.cpu_path  # a resumed demo equals an uninterrupted one on either CPU path
def test_kill_demo(demo_run):
    ref, folders = demo_run.get()
    want = demo_figures(ref.output)
    for out in folders:
        assert demo_figures(out) == want, f"{out.name}: other demo results than the uninterrupted run"
        assert_no_temporaries(out)
    assert KILLS["demo"] >= AT_LEAST["demo"], MOMENTS["demo"]


def test_kill_points_in_total():
    if set(KILLS) != set(WANTED):
        pytest.skip(f"only {sorted(KILLS)} ran")
    print("kills that hit a running process:", KILLS, "moments (s):", MOMENTS)
    assert sum(KILLS.values()) >= TOTAL_AT_LEAST, KILLS
