"""The small-batch detection study; ``tools/analysis_tools/small_batch_detection.py`` is its
command line and re-exports the names below.

``rows``: the rows (a norm at a batch) and the setting they share; ``data``: the digits set
of a setting; ``configs``: the mmengine config of one run; ``jobs``: a run as plain json,
training it, and the pool of child processes; ``goals``: mean and spread over seeds and the
goals checked on them; ``report``: the tables and generated markdown (through
``study_markdown``, which the classification study shares); ``plots``: the figure;
``probes``: the BN-only probes that chose the setting; ``converged``: the rows at several
budgets, at equal images and against compute; ``step_cost``: the CPU per training image
of each row, side by side in one process. Training and running jobs, the options and
the report header are the detection studies' shared ``detection_runner``.
"""
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]
for _path in (REPO, REPO / 'tools', REPO / 'tools' / 'analysis_tools'):
    # cbn_plugin from this checkout, make_digits_det, study_markdown
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from .configs import CONFIG, build_config  # noqa: E402,F401
from .converged import (  # noqa: E402,F401
    BUDGETS, CONVERGED_BEGIN, CONVERGED_END, CONVERGED_JSON, CONVERGED_PLOT, CONVERGED_ROWS,
    FIRST_ROWS, compute_table, cpu_to_reach, curves, plan, plot_converged, publish_converged,
    render_converged, run_converged, step_cost_of)
from .data import ensure_data  # noqa: E402,F401
from .goals import goals, stats, summarise  # noqa: E402,F401
from .jobs import (  # noqa: E402,F401
    load_average, loss_curve, make_job, make_recorder, run_jobs, run_one)
from .plots import plot, plot_rows  # noqa: E402,F401
from .probes import run_probes  # noqa: E402,F401
from .report import (  # noqa: E402,F401
    DOC, DOC_BEGIN, DOC_END, PLOT, PROBE_BEGIN, PROBE_END, PROBES_JSON, RESULTS_JSON, TITLE, fmt,
    probe_table, render, render_probes, summary_table)
from .rows import (  # noqa: E402,F401
    DEFAULT_ROWS, GN_GROUPS, ROWS, SETTING_DEFAULTS, distinct_rows, norm_cfg, setting_from_args,
    setting_name, training_of)
from .step_cost import (  # noqa: E402,F401
    STEP_COST_BEGIN, STEP_COST_END, STEP_COST_JSON, STEP_COST_ROWS, render_step_cost,
    run_step_cost)
