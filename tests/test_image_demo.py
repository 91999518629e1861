"""`python -m launch.image_demo` (README, first steps): a summary of InternImage-T's
prediction on a photo; a wrong model name or weights file is one line, exit 2 (it was a
traceback)."""

from __future__ import annotations

import json

import pytest

from launch.image_demo import main


def test_the_demo_prints_a_summary_of_the_prediction(capsys):
    summary = main(["--image-size", "64"])
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed == summary
    assert summary["input"] == [1, 3, 64, 64] and len(summary["top5_classes"]) == 5
    assert summary["parameters"] > 29_000_000  # InternImage-T: 30M (REFERENCE.md)


@pytest.mark.parametrize("args, says", [
    (["--weights", "nothere.pth"], "nothere.pth"),
    (["--model", "internimage_q"], "unknown InternImage model 'internimage_q'"),
])
def test_a_wrong_model_or_weights_file_is_one_line(args, says, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(args)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("launch.image_demo: ") and err.count("\n") == 1 and says in err, err
