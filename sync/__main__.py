from __future__ import annotations

from sync.cli import main

main()
