import contextlib
import fcntl
import json
import os
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if os.environ.get("PYTEST_XDIST_WORKER"):  # pytest -n N: N test processes share the cores, one thread each
    os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402

from prefmodule.paths import resolve  # noqa: E402

TINY_MODEL = "asset://tiny-llama"


@pytest.fixture(autouse=True)
def no_rendezvous_left_over():
    """Lightning writes the rendezvous it picks into ``os.environ`` (``MASTER_PORT``, ...) when a test runs a
    strategy in this process; a later test's two-process run would inherit that port, which this process may
    still hold (EADDRINUSE). Each test starts without them."""
    for name in ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK",
                 "LOCAL_WORLD_SIZE"):
        os.environ.pop(name, None)


@contextlib.contextmanager
def one_launch_at_a_time():
    """Runs of two processes take turns across pytest-xdist's workers: Lightning picks a free port for the ranks'
    rendezvous, and the gloo connections of a run beside it could take that port before it is bound (EADDRINUSE)."""
    with open(os.path.join(tempfile.gettempdir(), "prefmodule-tests-two-processes.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def read_jsonl(path):
    with open(path) as handle:
        return [json.loads(line) for line in handle if line.strip()]


def write_jsonl(path, rows):
    with open(path, "w") as handle:
        for row in rows:
            handle.write((row if isinstance(row, str) else json.dumps(row)) + "\n")
    return str(path)


def full_and_chunked_modules(module_class, **settings):
    """Two configured modules on the same weights: full logits, and a head chunked by 7 tokens (7 divides no
    batch's token count: chunks of every size occur)."""
    modules = []
    for chunk_size in (0, 7):
        module = module_class(model=TINY_MODEL, logps_chunk_size=chunk_size, **settings)
        module.configure_model()
        modules.append(module)
    assert not modules[0].chunked_logps and modules[1].chunked_logps
    return modules


@pytest.fixture(scope="session")
def demo_rows():
    return read_jsonl(resolve("asset://demo/train.jsonl"))


@pytest.fixture
def small_data(tmp_path, demo_rows):
    """A 32-pair train file and a 16-pair val file cut from the shipped demo data."""
    val_rows = read_jsonl(resolve("asset://demo/val.jsonl"))
    return write_jsonl(tmp_path / "train.jsonl", demo_rows[:32]), write_jsonl(tmp_path / "val.jsonl", val_rows[:16])


@pytest.fixture(autouse=True)
def samples_off_unless_marked(request, monkeypatch):
    """Generating samples takes about a second per fit on 2 CPU cores: a test runs with no samples by default
    (``SampleWriter``'s ``num_prompts`` 0, the CLI's ``samples`` group included) unless marked ``samples`` (tests
    about samples, the report, loggers' tables, the defaults)."""
    if request.node.get_closest_marker("samples") is not None:
        return
    from prefmodule.training.callbacks import SampleWriter

    init = SampleWriter.__init__
    monkeypatch.setattr(init, "__defaults__", (0, *init.__defaults__[1:]))
