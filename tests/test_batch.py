"""The one batch runner that segment, the cascade bundle and pseudo_label share: claims, finished cases, failure
isolation, warnings per case, and every rank's cases merged on rank 0."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from flare_c2f_extensions.errors import InputError
from flare_c2f_extensions.runs.batch import BatchRunner, Case
from flare_c2f_extensions.runs.ranks import Ranks


class FakeWork:
    """``a`` was finished before, ``c`` must be redone, ``bad`` fails; every processed case warns once."""

    def __init__(self):
        self.processed = []

    def finished(self, case):
        if case.name == "a":
            return None, {"kept": True}
        return ("its input has changed since" if case.name == "c" else ""), {}

    def process(self, case):
        logging.getLogger("flare_c2f_extensions.test").warning("%s: looked at", case.image)
        self.processed.append(case.name)
        if case.name == "bad":
            raise InputError(f"{case.image}: not a CT")
        if case.name == "boom":
            raise RuntimeError("deep inside")
        return {"made": case.name}


def _cases(tmp_path, names):
    return [Case(f"/in/{name}.nii.gz", name, tmp_path / f"{name.rstrip('2')}.nii.gz") for name in names]


def test_claims_finished_cases_and_failures_each_stay_in_their_case(tmp_path):
    work = FakeWork()
    result = BatchRunner(work, _cases(tmp_path, ["b", "a", "bad", "boom", "c", "b2"]), progress=None).run()
    cases = {case["case"]: case for case in result["cases"]}
    assert [case["case"] for case in result["cases"]] == ["a", "b", "b2", "bad", "boom", "c"]
    assert result["ranks"] == []
    assert cases["a"]["status"] == "exists" and cases["a"]["kept"] and "a" not in work.processed
    assert cases["b"]["status"] == "done" and cases["b"]["made"] == "b" and cases["b"]["seconds"] >= 0
    assert cases["b2"]["status"] == "failed" and "already that of /in/b.nii.gz" in cases["b2"]["error"]
    assert "b2" not in work.processed  # a claimed output is never written twice
    assert cases["bad"] == {**cases["bad"], "status": "failed", "error": "/in/bad.nii.gz: not a CT"}
    assert cases["boom"]["error"] == "/in/boom.nii.gz: RuntimeError: deep inside"
    assert cases["c"]["status"] == "done" and cases["c"]["redone"] == "its input has changed since"
    assert cases["c"]["warnings"] == [f"{tmp_path / 'c.nii.gz'}: exists but its input has changed since: segmenting "
                                      "the case again", "/in/c.nii.gz: looked at"]


def test_overwrite_makes_every_case_again(tmp_path):
    work = FakeWork()
    result = BatchRunner(work, _cases(tmp_path, ["a", "c"]), overwrite=True, progress=None).run()
    assert [case["status"] for case in result["cases"]] == ["done", "done"] and work.processed == ["a", "c"]
    assert "redone" not in result["cases"][1]


def test_lines_progress_prints_one_line_per_case(tmp_path, capsys):
    BatchRunner(FakeWork(), _cases(tmp_path, ["a", "bad"]), progress="lines").run()
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("[")]
    assert lines[0].startswith("[1/2] a: ") and "exists, skipped" in lines[0]
    assert lines[1] == "[2/2] bad: failed: /in/bad.nii.gz: not a CT"


@pytest.mark.parametrize("rank", [0, 1])
def test_under_two_ranks_each_takes_its_share_and_rank_0_merges(tmp_path, monkeypatch, rank):
    handed = {}

    def gather(self, part):
        handed["part"] = part
        other = {"cases": [{"case": "z", "output": "z", "status": "done"}], "device": "cpu", "threads": 1}
        return ([part, other] if self.rank == 0 else None)

    monkeypatch.setattr(Ranks, "from_env", classmethod(lambda cls: Ranks(rank, 2, rank, 2)))
    monkeypatch.setattr(Ranks, "start", lambda self: None)
    monkeypatch.setattr(Ranks, "gather", gather)
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)  # the rank's share of cores: not this process's
    work = FakeWork()
    result = BatchRunner(work, _cases(tmp_path, ["a", "b", "c", "d"]), progress=None).run()
    mine = sorted(str(tmp_path / f"{n}.nii.gz") for n in "abcd")[rank::2]
    assert sorted(case["output"] for case in handed["part"]["cases"]) == mine
    if rank == 1:
        assert result is None
    else:
        assert [case["case"] for case in result["cases"]] == ["a", "c", "z"]
        assert [entry["cases"] for entry in result["ranks"]] == [["a", "c"], ["z"]]
        assert Path(result["cases"][0]["output"]).name == "a.nii.gz"


class ReadingWork(FakeWork):
    """FakeWork that reads ahead: ``slow`` cannot finish until the case after it is being read on another thread;
    ``unreadable`` fails while it is read ahead."""

    def __init__(self):
        super().__init__()
        import threading

        self.read, self.given, self.reading = [], {}, threading.Event()

    def read_ahead(self, case):
        import threading

        self.read.append((case.name, threading.current_thread() is threading.main_thread()))
        self.reading.set()
        if case.name == "unreadable":
            raise InputError(f"{case.image}: truncated gzip")
        return f"decoded {case.name}"

    def process(self, case, ahead=None):
        self.given[case.name] = ahead
        if case.name == "slow":
            assert self.reading.wait(timeout=30), "the next case was not read while this one ran"
        return super().process(case)


def test_the_next_case_is_read_on_another_thread_while_a_case_runs(tmp_path):
    """Issue 21: reading ahead. The next case's input is decoded on a background thread during the case before it
    (so ``slow`` sees it being read), reaches process as ``ahead``, and a case already finished is not read at all."""
    work = ReadingWork()
    result = BatchRunner(work, _cases(tmp_path, ["slow", "b", "a", "c"]), progress=None).run()
    assert [case["status"] for case in result["cases"]] == ["exists", "done", "done", "done"]
    assert work.read == [("b", False), ("c", False)]  # "slow" was read in its turn, "a" is finished
    assert work.given == {"slow": None, "b": "decoded b", "c": "decoded c"}


def test_a_case_that_fails_while_read_ahead_fails_in_its_turn_and_alone(tmp_path):
    work = ReadingWork()
    result = BatchRunner(work, _cases(tmp_path, ["b", "unreadable", "c"]), progress=None).run()
    cases = {case["case"]: case for case in result["cases"]}
    assert cases["unreadable"]["status"] == "failed"
    assert cases["unreadable"]["error"] == "/in/unreadable.nii.gz: truncated gzip"
    assert cases["b"]["status"] == cases["c"]["status"] == "done" and work.processed == ["b", "c"]
    assert "unreadable" not in work.given


def test_overwrite_reads_ahead_every_case_and_a_single_case_is_read_in_its_turn(tmp_path):
    work = ReadingWork()
    BatchRunner(work, _cases(tmp_path, ["b", "a"]), overwrite=True, progress=None).run()
    assert work.read == [("a", False)] and work.given == {"b": None, "a": "decoded a"}
    alone = ReadingWork()
    BatchRunner(alone, _cases(tmp_path, ["b"]), progress=None).run()
    assert alone.read == [] and alone.given == {"b": None}
