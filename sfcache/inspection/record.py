"""The base of every inspection result: a frozen record that prints as JSON."""

from __future__ import annotations

import dataclasses
import json


class Record:
    """A frozen dataclass result of an inspection (subclasses add the fields)."""

    def to_json(self) -> dict:
        """This record as JSON types (what `sf inspect-cache --json` prints)."""
        return json.loads(json.dumps(dataclasses.asdict(self)))
