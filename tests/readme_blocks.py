"""The README's ```bash blocks, as CI runs them (stdlib only: ``.ci/run`` uses it first).

``blocks()`` returns every ```bash fenced block of README.md in order. A block directly
preceded by the HTML comment ``<!-- not run by CI: REASON -->`` (only blank lines between)
is not run; that marker is the only way to leave a block out, and its reason is listed.

``runnable(code)`` is a block as run: unchanged, except that a command that runs the
test suite itself (``python -m pytest``) is not run again from inside the test suite:
from a line ``A && B && python -m pytest -q`` the runner runs ``A && B``, and a line that
only runs pytest is replaced by an ``echo`` saying that it is the command CI is running
(``.ci/run`` runs the README's test line, see ``readme_test_line``).

    python3 tests/readme_blocks.py test-line   # prints the README's test command
    python3 tests/readme_blocks.py list        # lists the blocks (and those not run)
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"
SKIP_MARKER = re.compile(r"<!-- not run by CI: (?P<reason>[^\n]+?) -->\s*\Z")
FENCE = re.compile(r"^```bash\n(?P<code>.*?)^```$", re.S | re.M)
PYTEST = "python -m pytest"


@dataclass(frozen=True)
class Block:
    number: int  # 1-based, in README order
    line: int  # README line of the opening fence
    code: str
    skip: str | None  # the marker's reason, or None (the block is run)

    @property
    def title(self) -> str:
        first = next((ln for ln in self.code.splitlines() if ln.strip()), "")
        return first.split("#")[0].strip()[:60]


def blocks(text: str | None = None) -> list[Block]:
    """Every ```bash block of README.md (or of ``text``), in order."""
    text = README.read_text(encoding="utf-8") if text is None else text
    out = []
    for k, m in enumerate(FENCE.finditer(text), 1):
        before = text[: m.start()]
        skip = SKIP_MARKER.search(before)
        out.append(Block(k, before.count("\n") + 1, m.group("code"),
                         skip.group("reason").strip() if skip else None))
    return out


def runnable(code: str) -> str:
    """``code`` without the commands that run pytest (see the module docstring)."""
    lines = []
    for line in code.splitlines():
        if PYTEST not in line:
            lines.append(line)
            continue
        parts = [p.strip() for p in line.split("&&")]
        keep = [p for p in parts if PYTEST not in p]
        said = next(p for p in parts if PYTEST in p).split("#")[0].strip()
        note = (f"README runner: not run here: '{said}' is the command CI is running "
                "(.ci/run runs the README's test line)")
        lines.append(f"echo {_quote(note)}")
        if keep:
            lines.append(" && ".join(keep))
    return "\n".join(lines) + "\n"


def readme_test_line(text: str | None = None) -> str:
    """The README's test command: the line of its first ```bash block that runs pytest."""
    first = blocks(text)[0]
    found = [ln.split("#")[0].strip() for ln in first.code.splitlines() if PYTEST in ln]
    if len(found) != 1:
        raise SystemExit(f"README.md: expected one '{PYTEST}' line in the first bash block, "
                         f"found {len(found)}")
    return found[0]


def _quote(s: str) -> str:
    return "'" + s.replace("'", "'\\''") + "'"


def main(argv: list[str]) -> int:
    if argv == ["test-line"]:
        print(readme_test_line())
        return 0
    if argv == ["list"]:
        for b in blocks():
            state = f"not run by CI: {b.skip}" if b.skip else "run"
            print(f"block {b.number:2d} (README.md line {b.line}): {b.title}  [{state}]")
        return 0
    print(__doc__.strip().splitlines()[-2].strip(), file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
