"""Progress when stderr is not a terminal: plain lines, about one per tenth of the work, and a last one."""
import re

from clarity_fast.progress import LineProgress, progress


def test_line_progress_writes_tenths_and_the_end(capsys):
    bar = LineProgress(total=25, desc="training")
    for i in range(25):
        bar.update(1)
        bar.set_postfix(loss=f"{1 / (i + 1):.3f}")
    bar.close()
    lines = capsys.readouterr().err.splitlines()
    counts = [re.match(r"training: (\d+)/25", line).group(1) for line in lines]
    assert counts == [str(n) for n in range(2, 25, 2)] + ["25"]
    assert "(100%)" in lines[-1] and "elapsed" in lines[-1] and "loss=0.040" in lines[-1]


def test_progress_on_a_file_is_lines_and_iterates_everything(capsys):
    # pytest's captured stderr is not a terminal: the line writer, not tqdm's carriage returns
    assert list(progress(range(7), desc="evaluating")) == list(range(7))
    err = capsys.readouterr().err
    assert "\r" not in err and err.splitlines()[-1].startswith("evaluating: 7/7 (100%)")
    assert list(progress(range(3), desc="quiet", enabled=False)) == [0, 1, 2]
    assert capsys.readouterr().err == ""
