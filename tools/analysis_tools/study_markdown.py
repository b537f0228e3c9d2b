"""The markdown both studies write: tables, and the generated block of a doc page.

``small_batch_study.py`` (``small_batch/report.py``) and ``small_batch_detection.py``
(``small_batch_det/report.py``) render their results with these two functions; a page's
prose lives outside the generated block, which a rerun replaces.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable, Sequence


def md_table(header: Sequence, rows: Iterable[Sequence]) -> str:
    """A markdown table: one header row, then one line per row of cells (``str()`` each)."""
    lines = ['| ' + ' | '.join(str(h) for h in header) + ' |', '|' + '---|' * len(header)]
    lines += ['| ' + ' | '.join(str(c) for c in row) + ' |' for row in rows]
    return '\n'.join(lines)


def write_block(path: Path, begin: str, end: str, block: str, title: str,
                intro: str = '') -> None:
    """Put ``block`` between the ``begin`` and ``end`` markers of ``path``.

    An existing block is replaced and the text around it kept; a page without the
    markers gets them (and the block) appended; a missing page starts with ``# title``
    and the paragraph ``intro``."""
    text = path.read_text() if path.is_file() else f'# {title}\n' + (f'\n{intro}' if intro else '')
    new = f'{begin}\n{block}\n{end}'
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        text = head + new + rest.split(end, 1)[1]
    else:
        text = text.rstrip('\n') + '\n\n' + new + '\n'
    path.write_text(text)
