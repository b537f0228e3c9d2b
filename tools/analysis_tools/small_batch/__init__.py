"""The small-batch study; ``tools/analysis_tools/small_batch_study.py`` is its command line.

``data``: the digits tasks; ``models``: the networks and the norm each row swaps in; ``probe``:
the statistics-error and gradient analysis; ``grid``: the rows and the runs; ``runner``:
training a run, worker processes and the resumable cache; ``report``: tables and the generated
markdown (through ``study_markdown``, which the detection study shares); ``plots``: the
figures. The names below are the ones the tests and the command use.
"""
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # cbn_plugin from this checkout

from .data import load_task  # noqa: E402,F401
from .grid import (  # noqa: E402,F401
    BACKWARDS, CBN_COMBOS, DEFAULT, FORMS, NORMS, PAPER, PLAIN, build_grid, build_precise_grid,
    cbn_label, display, is_cbn, spec_for)
from .models import ARCHS, SmallCNN, cbn_kwargs, make_norm  # noqa: E402,F401
from .probe import NormProbe, gradient_fidelity  # noqa: E402,F401
from .report import (  # noqa: E402,F401
    DOC_BEGIN, DOC_END, PRECISE_BEGIN, PRECISE_END, render)
from .runner import evaluate, precise_accuracy, run_jobs, train_run  # noqa: E402,F401
