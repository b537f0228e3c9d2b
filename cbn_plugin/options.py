"""CBN's options in one place: the presets, the allowed values, and their checks.

The layer, ``CBNHook`` and ``precise_bn`` validate what users write in a
config with these, so a bad value gets the same clear error wherever it is
given: the option's owner, its name, the bad value and what would be valid.
"""
from __future__ import annotations

import math

VARIANCE_RULES = ('clamp', 'exclude')
# A layer built without a window_size: CBNHook derives one from the images per optimizer
# step (``window_images``); a layer used on its own pools this many steps.
DEFAULT_WINDOW_SIZE = 4
# The images a derived window pools: the window sweep (docs/small_batch_detection.md) and
# the classification study (docs/small_batch.md) both peak at about 32.
WINDOW_IMAGES = 32
COMPENSATIONS = ('mu_nu', 'var')
RUNNING_STATS_SOURCES = ('batch', 'window')
STATS_BACKWARD = ('current', 'pooled', 'compensated')
# How a call pools the same step's other calls (gradient-accumulation micro-batches):
# 'merge': with its earlier calls (the step's statistics so far); 'own': with none (its own
# images and the past steps' full records); 'two_pass': with all of them, taken by a
# statistics pass over the step's micro-batches before the training pass
# (``cbn_plugin.statistics_pass``). The step's record merges every call in each case.
ACCUMULATION = ('merge', 'own', 'two_pass')
# Presets for the three choices where this plugin and the paper differ; an
# argument given explicitly overrides its preset. 'default' is what the
# small-batch study measured best (docs/small_batch.md); 'paper' is the
# algorithm of the paper and the authors' code (with their variance rule,
# variance_rule='exclude', it equals the authors' layer).
MODES = {
    'default': dict(stats_backward='compensated', running_stats='window', compensation='var'),
    'paper': dict(stats_backward='current', running_stats='batch', compensation='mu_nu'),
}


def _prefix(owner: str) -> str:
    return f'{owner} ' if owner else ''


def check_int(name: str, value, minimum: int = 0, owner: str = '', meaning: str = '') -> int:
    """``value`` must be an ``int`` (not a bool) ``>= minimum``; ``meaning`` explains a bound."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        hint = f' ({meaning})' if meaning else ''
        raise ValueError(f'{_prefix(owner)}{name} must be an integer >= {minimum}{hint}, '
                         f'got {value!r}')
    return value


def check_number(name: str, value, low: float = 0.0, high: float = math.inf,
                 owner: str = '', meaning: str = '', open_low: bool = False) -> float:
    """``value`` must be a finite real number in ``[low, high]`` (``(low, high]`` if ``open_low``)."""
    ok = (not isinstance(value, bool) and isinstance(value, (int, float))
          and not math.isnan(value) and (value > low if open_low else value >= low)
          and math.isfinite(value) and value <= high)
    if not ok:
        if high == math.inf:
            span = f'> {low:g}' if open_low else f'a number >= {low:g}'
        else:
            span = f"a number in {'(' if open_low else '['}{low:g}, {high:g}]"
        hint = f' ({meaning})' if meaning else ''
        raise ValueError(f'{_prefix(owner)}{name} must be {span}{hint}, got {value!r}')
    return float(value)


def check_choice(name: str, value, choices: tuple, owner: str = '') -> str:
    if value not in choices:
        raise ValueError(f'{_prefix(owner)}{name} must be one of {choices}, got {value!r}')
    return value


def check_bool(name: str, value, owner: str = '') -> bool:
    if not isinstance(value, bool):
        raise ValueError(f'{_prefix(owner)}{name} must be True or False, got {value!r}')
    return value


def resolve_mode(mode: str, owner: str = 'CBN', **explicit) -> dict:
    """The preset of ``mode`` with every explicitly given (non-``None``) choice over it."""
    check_choice('mode', mode, tuple(MODES), owner)
    return {key: MODES[mode][key] if explicit.get(key) is None else explicit[key]
            for key in MODES[mode]}


def check_layer_options(window_size, rho, variance_rule, mode, running_stats, stats_backward,
                        compensation, dvar_stride, per_call_windows, eps, accumulation='merge',
                        owner: str = 'CBN') -> dict:
    """Every CBN layer argument checked; returns them resolved (the mode's preset filled in)."""
    choices = resolve_mode(mode, owner, running_stats=running_stats,
                           stats_backward=stats_backward, compensation=compensation)
    given = window_size is not None
    window_size = check_int('window_size', DEFAULT_WINDOW_SIZE if window_size is None
                            else window_size, 1, owner, '1 is plain BN; None: CBNHook derives it')
    check_number('rho', rho, 0.0, 1.0, owner, '1 = CBN, 0 = naive CBN')
    check_choice('variance_rule', variance_rule, VARIANCE_RULES, owner)
    check_choice('running_stats', choices['running_stats'], RUNNING_STATS_SOURCES, owner)
    check_choice('stats_backward', choices['stats_backward'], STATS_BACKWARD, owner)
    check_choice('compensation', choices['compensation'], COMPENSATIONS, owner)
    check_int('dvar_stride', dvar_stride, 1, owner, '1 is exact')
    check_bool('per_call_windows', per_call_windows, owner)
    check_number('eps', eps, 0.0, owner=owner, open_low=True)
    check_choice('accumulation', accumulation, ACCUMULATION, owner)
    if accumulation == 'two_pass' and per_call_windows:
        raise ValueError(f"{_prefix(owner)}accumulation='two_pass' pools the calls of a step "
                         'into one record, and per_call_windows=True keeps a window per call '
                         "position: use per_call_windows=False, or accumulation='merge'")
    return dict(window_size=window_size, window_size_given=given, rho=float(rho),
                variance_rule=variance_rule,
                dvar_stride=dvar_stride, per_call_windows=per_call_windows,
                accumulation=accumulation, **choices)


def derived_window_size(images_per_step: int, window_images: int = WINDOW_IMAGES) -> int:
    """The window ``CBNHook`` gives a layer whose config sets none: the steps that hold
    about ``window_images`` images, ``max(2, round(window_images / images_per_step))``
    (``images_per_step``: per process, batch size x accumulated micro-batches)."""
    check_int('images_per_step', images_per_step, 1, 'derived_window_size')
    check_int('window_images', window_images, 1, 'derived_window_size')
    return max(2, round(window_images / images_per_step))
