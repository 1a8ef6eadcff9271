"""merge(..., move=True) killed at every file-system step, with hard links and where the file
system has none (os.link fails with EPERM, so files are copied): every kill leaves the parts
intact (they read back exactly) or the target complete (it does), with or without the merge's
journal in the target, and running the same merge again then finishes the job: the target holds
every sample of the parts, in order, and verifies; the parts are gone. Nothing is lost at any kill
point.

The kills are deterministic: a driver subprocess forks one child per kill point; the child counts
the merge's calls of os.open, os.link, os.rename, os.replace, os.unlink, os.rmdir and os.fsync
and exits (os._exit, as SIGKILL would leave it) just before call k.
"""

import json
import os
import pathlib
import subprocess
import sys
import textwrap

import pytest

DRIVER = textwrap.dedent(r'''
    import errno, json, os, shutil, sys, warnings
    import numpy as np
    import shardfeed
    from shardfeed.format import MANIFEST_NAME, MERGE_JOURNAL_NAME

    root, no_links = sys.argv[1], sys.argv[2] == "1"
    CALLS = ("open", "link", "rename", "replace", "unlink", "rmdir", "fsync")
    REAL = {name: getattr(os, name) for name in CALLS}
    FIELDS = {"x": ("int32", (2,)), "t": ("int16", (None,))}
    SIZES = [5, 3]  # samples per part; 2 per shard: 3 + 2 shards, each with a heap file

    def part_data(k, n):
        x = (np.arange(2 * n, dtype=np.int32).reshape(n, 2) + 1000 * k)
        return {"x": x, "t": [np.full(i % 3, 10 * k + i, np.int16) for i in range(n)]}

    templates = []
    for k, n in enumerate(SIZES):
        template = os.path.join(root, f"template{k}")
        with shardfeed.Writer(template, fields=FIELDS, shard_size=64 + 2 * 24) as w:
            w.extend(part_data(k, n))
        templates.append(template)

    def read(path):
        with shardfeed.open(path) as ds:
            batch = ds.read(np.arange(len(ds)))
        rows = [batch["t"][i, :batch.lengths["t"][i]].tolist() for i in range(len(ds))]
        return batch["x"].tolist(), rows

    def expected(parts):
        xs, ts = [], []
        for k, n in enumerate(SIZES):
            data = part_data(k, n)
            xs += data["x"].tolist()
            ts += [t.tolist() for t in data["t"]]
        return xs, ts

    def patched(kill_at, counter):
        def wrap(name):
            def call(*args, **kwargs):
                if counter[0] == kill_at:
                    os._exit(77)
                counter[0] += 1
                if name == "link" and no_links:
                    raise OSError(errno.EPERM, "Operation not permitted")
                return REAL[name](*args, **kwargs)
            return call
        for name in CALLS:
            setattr(os, name, wrap(name))

    def fresh(k):
        work = os.path.join(root, f"run{k}")
        shutil.rmtree(work, ignore_errors=True)
        os.makedirs(work)
        parts = [os.path.join(work, f"part{i}") for i in range(len(SIZES))]
        for template, part in zip(templates, parts):
            shutil.copytree(template, part)
        return parts, os.path.join(work, "merged")

    def merge_unkilled(parts, target):
        real_link = os.link
        if no_links:
            def no_link(*args, **kwargs):
                raise OSError(errno.EPERM, "Operation not permitted")
            os.link = no_link
        try:
            return shardfeed.merge(parts, target, move=True)
        finally:
            os.link = real_link

    # a run without kills counts the steps
    parts, target = fresh("count")
    pid = os.fork()
    if pid == 0:
        counter = [0]
        patched(None, counter)
        shardfeed.merge(parts, target, move=True)
        with open(os.path.join(root, "steps"), "w") as f:
            f.write(str(counter[0]))
        os._exit(0)
    assert os.waitpid(pid, 0)[1] == 0
    steps = int(open(os.path.join(root, "steps")).read())
    want = expected(parts)
    states, failures = {}, []
    for k in range(steps + 1):
        parts, target = fresh(k)
        pid = os.fork()
        if pid == 0:
            patched(k, [0])
            shardfeed.merge(parts, target, move=True)
            os._exit(0)
        status = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
        try:
            assert status == (0 if k == steps else 77), f"exit status {status}"
            journal = os.path.exists(os.path.join(target, MERGE_JOURNAL_NAME))
            if os.path.exists(os.path.join(target, MANIFEST_NAME)):
                state = "target complete"
                assert read(target) == want
            else:  # no target: every part opens and reads back as it was
                state = "parts intact, journal" if journal else "parts intact"
                got = [read(p) for p in parts]
                assert [x for g in got for x in g[0]] == want[0] and [t for g in got for t in g[1]] == want[1]
            states[state] = states.get(state, 0) + 1
            if os.path.exists(os.path.join(target, MANIFEST_NAME)) and state == "target complete" and \
                    not os.path.exists(os.path.join(target, MERGE_JOURNAL_NAME)):
                try:  # the job was done (parts removed, then the journal): nothing to complete
                    merge_unkilled(parts, target)
                    raise AssertionError("a merge into a complete target succeeded")
                except FileExistsError:
                    pass
                notes = shardfeed.verify(target).notes  # at most the lock of the killed merge
                assert all("did not finish" in n for n in notes), notes
                if notes:
                    with warnings.catch_warnings(record=True):
                        warnings.simplefilter("always")
                        shardfeed.Writer(target, mode="a").close()
            else:
                result = merge_unkilled(parts, target)  # the re-run finishes the job
                assert result.num_samples == sum(SIZES), result
            assert read(target) == want
            report = shardfeed.verify(target)
            assert report.ok and not report.notes, str(report)
            assert sorted(os.listdir(target)) == [MANIFEST_NAME] + sorted(
                f"shard-{i:06d}.{e}" for i in range(5) for e in ("crc", "rec", "var")), os.listdir(target)
            assert not any(os.path.exists(p) for p in parts), [os.listdir(p) for p in parts if os.path.exists(p)]
        except Exception as exc:
            failures.append(f"kill at step {k}: {type(exc).__name__}: {exc}")
    print(json.dumps({"steps": steps, "states": states, "failures": failures}))
''')


@pytest.mark.parametrize("links", ["hard-links", "no-hard-links"])
def test_every_kill_of_a_moving_merge_is_completed_by_running_it_again(tmp_path, links):
    done = subprocess.run([sys.executable, "-c", DRIVER, str(tmp_path), "1" if links == "no-hard-links" else "0"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["failures"] == [], "\n".join(result["failures"])
    assert result["steps"] >= 30, result
    # every kind of state was reached: before the journal, between it and the manifest, after
    assert set(result["states"]) == {"parts intact", "parts intact, journal", "target complete"}, result


def test_a_different_merge_into_an_unfinished_one_is_refused(tmp_path):
    import numpy as np

    import shardfeed
    from shardfeed.format import MERGE_JOURNAL_NAME
    parts = []
    for k in range(2):
        path = str(tmp_path / f"part{k}")
        with shardfeed.Writer(path, fields={"x": "int8"}) as w:
            w.extend({"x": np.arange(3)})
        parts.append(path)
    target = tmp_path / "merged"
    target.mkdir()
    (target / MERGE_JOURNAL_NAME).write_text(json.dumps({
        "parts": [os.path.realpath(parts[0])], "move": True, "files": [],
        "manifest": json.loads(pathlib.Path(parts[0], "manifest.json").read_text())}))
    with pytest.raises(shardfeed.SourceError, match="did not finish; run that merge again"):
        shardfeed.merge(parts, str(target), move=True)
    with pytest.raises(shardfeed.SourceError, match="a merge into this directory did not finish"):
        shardfeed.Writer(str(target), fields={"x": "int8"})
    with pytest.raises(shardfeed.ShardReadError, match="a merge into this directory did not finish"):
        shardfeed.open(str(target))
    assert all(shardfeed.verify(p).ok for p in parts)
