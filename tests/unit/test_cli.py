"""The command line's own input: numbers out of range and unknown arguments are one line, exit 2;
a reader that leaves early gets no traceback."""

import os
import subprocess
import sys

import pytest

from ensemblekd.cli import main


@pytest.mark.parametrize("argv,fragment", [
    (["evaluate", "c.yaml", "--repeats", "-5"], "ensemblekd evaluate: error: argument --repeats: must be 0 or more, got -5"),
    (["evaluate", "c.yaml", "--warmup", "1.5"], "argument --warmup: expected a whole number, got '1.5'"),
    (["prepare", "digits", "out", "--shard-rows", "0"], "argument --shard-rows: must be 1 or more, got 0"),
    (["distil", "c.yaml"], "ensemblekd: error: argument command: invalid choice: 'distil'"),
    (["run"], "ensemblekd run: error: the following arguments are required: config"),
])
def test_bad_arguments_are_one_line(capsys, argv, fragment):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and len(err.strip().splitlines()) == 1 and fragment in err, err
    assert err.strip().endswith("--help'")


def test_a_reader_that_leaves_early_gets_no_traceback(tmp_path):
    """`ensemblekd inspect STORE | head`: once the reader has closed the pipe, the command stops
    quietly (exit 1, nothing on stderr) instead of printing a BrokenPipeError traceback."""
    read, write = os.pipe()
    os.close(read)  # no reader left: the first line printed meets a closed pipe
    try:
        proc = subprocess.run([sys.executable, "-m", "ensemblekd", "prepare", "digits", str(tmp_path / "digits")],
                              stdout=write, stderr=subprocess.PIPE, text=True, timeout=300, check=False)
    finally:
        os.close(write)
    assert (tmp_path / "digits" / "train").is_dir()  # the work was done; only its report had nowhere to go
    assert proc.returncode == 1 and proc.stderr == "", proc.stderr
