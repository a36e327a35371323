"""Benchmarks: every figure is a ratio against a baseline measured in the same run."""

PRESETS = ("tiny", "vggt-1b")   # BENCH_PRESET: tiny (CPU, minutes) or vggt-1b (the full architecture, a GPU)


def preset_settings(presets: dict, preset: str, area: str) -> dict:
    """An area's settings for `preset`; an unknown one is an error, never a silent tiny run."""
    if preset not in presets:
        raise ValueError(f"bench {area}: unknown preset {preset!r}; expected one of {', '.join(presets)}")
    return presets[preset]
