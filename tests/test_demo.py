"""`shardfeed demo`, the README's first command: trains a Keras model from a synthetic dataset and
reports per-epoch samples/s and memory; --read-only reads batches (and works without Keras). It
shows its own lines only, runs in a small memory cgroup, and cleans up after a killed run."""

import os
import re
import signal
import subprocess
import sys
import time

import pytest

import shardfeed

# A sanitizer runtime (LD_PRELOAD) intercepts malloc and quarantines freed memory: what a process
# holds is then no measure of what it needs.
UNDER_SANITIZER = pytest.mark.skipif(shardfeed._core.BUILD_INFO["sanitizers"] != "",
                                     reason="sanitizer runtimes quarantine freed memory")

DEMO_LINES = ("wrote ", "training a Keras", "epoch ", "dataset ", "private (anonymous) memory", "try --size-mb",
              "opened ", "read ")


def demo_command(tmp_path, *args):
    return [sys.executable, "-m", "shardfeed", "demo", "--dir", str(tmp_path), *args]


def clean_env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TF_CPP_MIN_LOG_LEVEL")}
    env.update(extra)
    return env


def run_demo(tmp_path, *args, env=None):
    done = subprocess.run(demo_command(tmp_path, *args), capture_output=True, text=True, timeout=300,
                          env=env or clean_env(), cwd=str(tmp_path))
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    assert not os.listdir(tmp_path), "the demo leaves its temporary dataset behind"
    return done


def test_demo_trains_a_keras_model_and_shows_only_its_own_lines(tmp_path):
    pytest.importorskip("keras", reason="the tensorflow extra is not installed")
    # TF_CPP_MIN_LOG_LEVEL=0 makes TensorFlow print its start-up lines (I0000 ... cpu_feature_guard)
    done = run_demo(tmp_path, "--samples", "3000", "--epochs", "2", "--batch-size", "128",
                    env=clean_env(TF_CPP_MIN_LOG_LEVEL="0"))
    out = done.stdout
    assert done.stderr == "", done.stderr
    assert all(line.startswith(DEMO_LINES) for line in out.splitlines()), out
    assert "wrote 3,000 samples" in out and "training a Keras" in out
    epochs = re.findall(r"epoch (\d)/2: loss ([\d.]+), accuracy ([\d.]+), val_accuracy ([\d.]+) \| ([\d,]+) "
                        r"samples/s \| peak RSS [\d.]+ [KMG]iB, private [\d.]+ [KMG]iB", out)
    assert [e[0] for e in epochs] == ["1", "2"], out
    assert float(epochs[1][1]) < float(epochs[0][1])  # it learns
    assert re.search(r"dataset [\d.]+ [KMG]iB; peak RSS [\d.]+ [KMG]iB, private [\d.]+ [KMG]iB; peak RSS = "
                     r"[\d.]+ x the dataset", out), out


def test_demo_read_only_reports_private_memory_next_to_rss(tmp_path):
    done = run_demo(tmp_path, "--samples", "2000", "--epochs", "2", "--read-only")
    assert done.stderr == "" and all(line.startswith(DEMO_LINES) for line in done.stdout.splitlines())
    assert re.search(r"read 4,000 samples in [\d.]+ s: [\d,]+ samples/s, .* peak RSS [\d.]+ [KMG]iB for a "
                     r"[\d.]+ [KMG]iB dataset, private at most [\d.]+ [KMG]iB", done.stdout), done.stdout


GENERATOR_PEAK = """
import sys
from shardfeed._demo import write_images

def peak():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM"))

before = peak()
write_images(sys.argv[1], int(sys.argv[2]), 32)
print(peak() - before)
"""


@UNDER_SANITIZER
@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs /proc (Linux) for the peak RSS")
def test_the_synthetic_data_generator_peaks_at_a_few_mib_whatever_the_size(tmp_path):
    """The generator made 16 MiB of records at a time with float64 temporaries: about 280 MiB at its
    peak, which a 256 MiB cgroup killed. Its growth in peak RSS (anonymous memory: the writer
    writes with write(), maps nothing) is now a few MiB, the same for 16 and 128 MiB of images."""
    growth = {}
    for mib in (16, 128):
        samples = (mib << 20) // (3 * 32 * 32 + 8)
        done = subprocess.run([sys.executable, "-c", GENERATOR_PEAK, str(tmp_path / f"d{mib}"), str(samples)],
                              capture_output=True, text=True, timeout=300, env=clean_env())
        assert done.returncode == 0, done.stderr
        growth[mib] = int(done.stdout)
    assert growth[128] < 24 << 20, growth
    assert growth[128] < growth[16] + (8 << 20), growth  # bounded: not proportional to the size


def _memory_cgroup(name):
    """A cgroup v1 memory cgroup, or the reason there is none."""
    root = "/sys/fs/cgroup/memory"
    if not os.path.isfile(os.path.join(root, "cgroup.procs")):
        return None, f"no cgroup v1 memory controller at {root}"
    path = os.path.join(root, name)
    try:
        os.mkdir(path)
        with open(os.path.join(path, "memory.limit_in_bytes"), "w") as f:
            f.write(str(256 << 20))
    except OSError as exc:
        if os.path.isdir(path):
            os.rmdir(path)
        return None, f"cannot create a memory cgroup (needs root): {exc}"
    return path, None


@UNDER_SANITIZER
def test_demo_read_only_runs_in_a_256_mib_memory_cgroup(tmp_path):
    """The issue's case: `shardfeed demo --read-only` (256 MiB of images) in a 256 MiB memory cgroup
    was OOM-killed while writing. It completes now: the process's own memory stays small, and
    the dataset's page-cache pages are reclaimable."""
    cgroup, reason = _memory_cgroup(f"shardfeed-test-{os.getpid()}")
    if cgroup is None:
        pytest.skip(reason)
    try:
        script = f'echo $$ > {cgroup}/cgroup.procs && exec "$@"'
        done = subprocess.run(["sh", "-c", script, "sh", *demo_command(tmp_path, "--read-only", "--epochs", "1")],
                              capture_output=True, text=True, timeout=600, env=clean_env(), cwd=str(tmp_path))
        with open(os.path.join(cgroup, "memory.oom_control")) as f:
            oom = dict(line.split() for line in f)
    finally:
        os.rmdir(cgroup)
    assert done.returncode == 0, (done.returncode, done.stdout, done.stderr[-2000:])
    assert int(oom.get("oom_kill", 0)) == 0, oom
    assert "wrote 87,154 samples (256.0 MiB)" in done.stdout and "read 87,154 samples" in done.stdout
    assert not os.listdir(tmp_path)


def _wait_for_dataset(tmp_path, proc, timeout=120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for entry in os.listdir(tmp_path):
            if entry.startswith(f"shardfeed-demo-{proc.pid}-") and \
                    os.path.isdir(os.path.join(tmp_path, entry, "images")):
                return entry
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    raise AssertionError("the demo did not start writing")


@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGTERM])
def test_a_killed_demo_leaves_no_temporary_directory_behind(tmp_path, how):
    """SIGTERM: the demo removes its directory on the way out. SIGKILL (or the OOM killer) cannot be
    caught: the directory stays until the next demo, which removes it (its pid is gone)."""
    proc = subprocess.Popen(demo_command(tmp_path, "--read-only", "--size-mb", "4000"), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, env=clean_env(), cwd=str(tmp_path))
    entry = _wait_for_dataset(tmp_path, proc)
    proc.send_signal(how)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode in (-how, 128 + how), (proc.returncode, err)
    if how == signal.SIGKILL:
        assert os.listdir(tmp_path) == [entry]  # what a kill leaves
        # a directory of a demo that is still running is left alone
        alive = tmp_path / f"shardfeed-demo-{os.getpid()}-abc123"
        alive.mkdir()
        run_demo_keeping = subprocess.run(demo_command(tmp_path, "--read-only", "--samples", "200", "--epochs", "1"),
                                          capture_output=True, text=True, timeout=300, env=clean_env())
        assert run_demo_keeping.returncode == 0, run_demo_keeping.stderr
        assert os.listdir(tmp_path) == [alive.name]
        alive.rmdir()
    else:
        assert b"Traceback" not in err, err
        assert os.listdir(tmp_path) == []
