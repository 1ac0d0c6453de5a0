"""Every error meant for the person running llmscale, under one base class.

:class:`UserError` subclasses carry a message that names the problem and the fix; ``llmscale`` (cli.py)
prints them without a traceback (exit 2 for a :class:`ConfigError`, 1 for the rest). Any other exception
is a bug and keeps its traceback. Each class also keeps the builtin base it always had (``ValueError``,
``RuntimeError``, ...), so ``except ValueError`` around config code still works.

What does not live here: exceptions that are internal signals (test helpers' ``DistributedTestError``).
"""
from __future__ import annotations


class UserError(Exception):
    """An error the user can fix; the message says how."""


class ConfigError(UserError, ValueError):
    """A configuration mistake, found before any work started."""


class LayoutError(UserError, ValueError):
    """A parallel layout or batch size that cannot run; the message names a layout that would."""


class TokenizerError(UserError, RuntimeError):
    """A tokenizer that cannot be trained or loaded as asked; the message says what to do instead."""


class PrepareError(UserError, RuntimeError):
    """Raw input that cannot be read or a dataset that cannot be written; the message says what to do."""


class DatasetError(UserError, RuntimeError):
    """A dataset folder that cannot be used as it is; the message says how to fix it."""


class CheckpointError(UserError, RuntimeError):
    """A checkpoint that cannot be written or used; the message names the file and what to do."""


class RNGStateError(CheckpointError):
    """An RNG state file that cannot be restored; the message names the file."""


class ExportError(UserError, RuntimeError):
    """A model or folder that cannot be converted or loaded exactly; the message names what is unsupported."""


class PlotError(UserError, RuntimeError):
    """A run directory that cannot be plotted; the message says why."""


class QuickstartError(UserError, RuntimeError):
    """A quickstart stage failed; the message names the stage and its log."""


class NonFiniteError(UserError, FloatingPointError):
    """A non-finite loss or gradient norm with ``train.nan_policy=raise``; the message says what to change."""


class FinetuneDataError(UserError, ValueError):
    """Fine-tuning data (classification or SFT) that cannot be read or used as it is; the message names the
    file and line, the problem and the fix."""
