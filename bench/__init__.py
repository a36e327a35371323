"""Benchmarks: every figure is a ratio against a baseline measured in the same run."""

from sfcache.errors import SfcacheError

PRESETS = ("tiny", "vggt-1b")  # BENCH_PRESET: tiny (CPU, minutes) or vggt-1b (the full architecture, a GPU)


def preset_settings(settings: dict, preset: str, area: str) -> dict:
    """An area's settings for `preset`, one of PRESETS (the one list every area and entry point checks);
    an unknown one is an error, never a silent tiny run."""
    if preset not in PRESETS:
        raise SfcacheError(
            f"bench {area}: unknown preset {preset!r} (BENCH_PRESET / --preset); expected one of {', '.join(PRESETS)}"
        )
    return settings[preset]
