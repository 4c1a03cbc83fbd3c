"""Helpers shared by the command-line tests (not a test module)."""

from __future__ import annotations

from istn.cli import main, main_reg


def user_error(capsys, argv: list[str], *needles: str, reg: bool = False) -> str:
    """Run the CLI in-process; assert exit 2 and one stderr line containing ``needles``."""
    code = (main_reg if reg else main)(argv)
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1, err
    assert "Traceback" not in err
    assert lines[0].startswith("istn: error: ")
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]
