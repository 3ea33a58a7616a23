"""`tailwise ...` run in this process (no interpreter start per call): exit code, stdout,
stderr, exactly as `tailwise_cli.main` ends a command."""

from __future__ import annotations

import sys

from tailwise_cli import main


def tailwise(capsys, monkeypatch, *args: str) -> tuple[int, str, str]:
    monkeypatch.setattr(sys, "argv", ["tailwise", *args])
    try:
        main()
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    out = capsys.readouterr()
    return code, out.out, out.err
