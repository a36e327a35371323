"""Third-party start-up notes that mean nothing to an sfcache user, filtered before that package is imported."""

from __future__ import annotations

import logging

ROBOSUITE_LOGGER = "robosuite_logs"  # robosuite.utils.log_utils.DefaultLogger's name
# robosuite's __init__ warns three lines when robosuite/macros_private.py is absent; its defaults are what LIBERO runs
MACRO_NOTES = ("No private macro file found", "It is recommended to use a private macro file", "To setup, run:")


def _not_a_macro_note(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith(MACRO_NOTES)


def quiet_robosuite() -> None:
    """Drop robosuite's "No private macro file" notes (call before robosuite or LIBERO is first imported); other
    robosuite messages pass. Calling it again adds nothing."""
    logger = logging.getLogger(ROBOSUITE_LOGGER)
    if _not_a_macro_note not in logger.filters:
        logger.addFilter(_not_a_macro_note)
