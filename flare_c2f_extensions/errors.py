"""Input errors: the error type, the warnings an input raised, and the one-line report of an input error.

Nothing here changes the interpreter when imported: a run's entry point (the command line's ``main``, each bundle's
``initialize`` step) calls :func:`install_error_hook` and :func:`install_warning_filters` itself.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings

__all__ = [
    "FAILED_CASES_EXIT_STATUS",
    "INPUT_LOGGER",
    "InputError",
    "InputWarnings",
    "input_error_in",
    "install_error_hook",
    "install_warning_filters",
    "start_run",
]

# the exit status of every command whose batch ran but some case failed (segment, pseudo_label, evaluate, the
# cascade bundle's run): 1 stays for a run that could not start (README, "Inputs")
FAILED_CASES_EXIT_STATUS = 3
INPUT_LOGGER = "flare_c2f_extensions.inputs"  # the logger of everything that reads or checks an input
logger = logging.getLogger(INPUT_LOGGER)


class InputError(ValueError):
    """An input file or folder that cannot be used; the message names it and says why."""


def input_error_in(error: BaseException | None) -> InputError | None:
    """The :class:`InputError` behind ``error``, following ``__cause__``/``__context__`` (MONAI wraps it)."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, InputError):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


class InputWarnings(logging.Handler):
    """``with InputWarnings() as warned: read_ct(...)``: the warnings reading an input logged (``warned.messages``),
    e.g. for a batch report; they are still logged as usual."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())

    def as_dict(self) -> dict:
        return {"warnings": list(self.messages)} if self.messages else {}

    def __enter__(self):
        logger.addHandler(self)
        return self

    def __exit__(self, *exc):
        logger.removeHandler(self)
        return False


def _report_input_errors(previous_hook):
    def hook(kind, error, traceback):
        cause = input_error_in(error)
        if cause is None or os.environ.get("FLARE_C2F_TRACEBACK"):
            return previous_hook(kind, error, traceback)
        print(f"error: {cause}\n(set FLARE_C2F_TRACEBACK=1 for the full traceback)", file=sys.stderr)

    hook.reports_input_errors = True
    return hook


def install_error_hook() -> None:
    """End an uncaught :class:`InputError` with one line, ``error: <message>`` (exit status stays 1).

    ``python -m monai.bundle run`` buries an input error under MONAI's config-evaluation traceback; with this hook
    the command ends with just the message that names the file and the problem. Installing it twice is harmless.
    """
    if not getattr(sys.excepthook, "reports_input_errors", False):
        sys.excepthook = _report_input_errors(sys.excepthook)


def install_warning_filters() -> None:
    """Silence warnings that are noise for this package's runs."""
    # With pydicom installed (DICOM input), MONAI's LoadImage also builds its nvImageCodec DICOM reader and warns
    # on every machine without that plugin: the plain pydicom decoders are used.
    warnings.filterwarnings("ignore", message="NvImgCodecPydicomReader: nvImageCodec decoder plugin did not register")


def start_run() -> bool:
    """Both of the above, for a run's entry point (a bundle's ``initialize``: ``$...errors.start_run()``)."""
    install_error_hook()
    install_warning_filters()
    return True
