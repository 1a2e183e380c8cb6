"""The main job, end to end: `unified-backup demo` with real processes and real SIGKILLs."""

import json
import re
import subprocess
import sys
import textwrap

import pytest

from unified_backup import demo, demo_picture

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
FRAMEWORKS = ("keras", "tf_keras", "lightning")


@pytest.mark.slow
@pytest.mark.keras
@pytest.mark.tf_keras
@pytest.mark.lightning
def test_demo_kills_resumes_matches_and_draws_the_curves_of_the_runs(tmp_path):
    result = subprocess.run(
        [
            sys.executable, "-m", "unified_backup", "demo", "--kills", "2", "--epochs", "6", "--seed", "7",
            "--workdir", str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert out.splitlines()[0].startswith("Training a small model in keras, tf_keras, lightning")
    assert re.search(r"About \d+ (seconds|minutes) on 2 CPU cores\.$", out.splitlines()[0])
    for framework in FRAMEWORKS:
        assert f"{framework}: 2 SIGKILL(s)" in out
    assert "resumed from" not in out and "started fresh" not in out  # one wording: demo.resumed_after
    assert out.count("final weights equal to the uninterrupted run: yes") == 3
    assert out.count("backup_dir after success: removed") == 3
    assert f"{demo.PICTURE}: the picture: {tmp_path / demo.PICTURE}" in out

    picture = (tmp_path / demo.PICTURE).read_bytes()
    assert picture.startswith(PNG_SIGNATURE) and len(picture) > 20_000
    from matplotlib.image import imread

    pixels = imread(tmp_path / demo.PICTURE)
    assert pixels.shape[1] > 2 * pixels.shape[0]  # one plot per framework, side by side
    assert pixels[..., :3].std() > 0.05  # not blank

    curves = json.loads((tmp_path / demo.CURVES).read_text())
    assert list(curves) == list(FRAMEWORKS)
    for framework, curve in curves.items():
        reference_run = json.loads((tmp_path / f"{framework}-reference.json").read_text())
        resumed_run = json.loads((tmp_path / f"{framework}-resumed.json").read_text())
        # The uninterrupted curve is that run's own losses; the last attempt's are the resumed run's.
        assert curve["reference"] == [reference_run["losses"][str(e)] for e in range(6)]
        assert curve["attempts"][-1]["losses"] == resumed_run["losses"]
        assert len(curve["kills"]) == 2 and len(curve["attempts"]) == 3
        assert [a["killed_after_s"] is None for a in curve["attempts"]] == [False, False, True]
        # Every epoch any attempt trained has the uninterrupted run's loss, bit for bit.
        trained = {}
        for attempt in curve["attempts"]:
            for epoch, loss in attempt["losses"].items():
                assert loss == curve["reference"][int(epoch)], (framework, epoch)
                trained[int(epoch)] = loss
        # A kill between a backup and its event line is the only way an epoch's loss goes unseen.
        assert len(set(range(6)) - set(trained)) <= 2
        # Each kill is marked where the next attempt resumed (demo.curve): after the epochs the killed attempt
        # reported (its event lines all read before counting), or one more if it died between an
        # epoch's backup and its line.
        for kill, killed in zip(curve["kills"], curve["attempts"][:-1], strict=True):
            reported = (killed["restored_epoch"] or 0) + len(killed["losses"])
            assert kill - reported in (0, 1), (framework, kill, killed)
            assert all(int(epoch) < kill for epoch in killed["losses"])
        for i, attempt in enumerate(curve["attempts"], 1):
            wording = demo.resumed_after(attempt["restored_epoch"])
            assert f"[{framework}] attempt {i}: {wording}; " in out  # the progress line
            assert f"{i:>7}  {wording:<26}  " in out  # the table's row
        assert curve["max_abs_diff"] == 0


def test_without_matplotlib_the_demo_says_how_to_get_the_picture(tmp_path):
    script = textwrap.dedent(
        """
        import sys
        sys.modules["matplotlib"] = None  # as if not installed
        from pathlib import Path
        from unified_backup import demo
        print(demo.draw_picture({"keras": {}}, Path(sys.argv[1])))
        """
    )
    result = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "matplotlib is not installed: pip install 'unified-backup[demo]'" in result.stdout
    assert not (tmp_path / demo.PICTURE).exists()


def test_the_picture_is_a_png_drawn_from_the_recorded_curves(tmp_path):
    attempts = [
        demo.Attempt(None, 0.9, 2, {0: 1.0, 1: 0.5}),  # killed in epoch 3, after backing up 2 epochs
        demo.Attempt(2, None, 2, {2: 0.25, 3: 0.125}),  # resumed after them, ran to the end
    ]
    outcome = demo.Outcome("keras", attempts, 0.0, 2, 0.1, 1.0, [], [1.0, 0.5, 0.25, 0.125])
    curve = demo.curve(outcome)
    assert curve["kills"] == [2] and curve["reference"] == outcome.reference_losses
    resumed = {"restored_epoch": 2, "killed_after_s": None, "losses": {"2": 0.25, "3": 0.125}}
    assert curve["attempts"][1] == resumed
    path = demo_picture.draw({"keras": curve, "lightning": curve}, tmp_path / demo.PICTURE)
    assert path.read_bytes().startswith(PNG_SIGNATURE)
    from matplotlib.image import imread

    pixels = imread(path)
    assert pixels.shape[1] > 2 * pixels.shape[0] and pixels[..., :3].std() > 0.05
