"""The profiles of the reproductions: ``experiments/profiles.yaml`` (Table 1) and
``experiments/smile_profiles.yaml`` (SMILE's tables), each ``{experiment: {profile: settings}}``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml


def read_profile(path: Path, experiment: str, profile: str) -> dict[str, Any]:
    """The settings of ``experiment``/``profile`` in the profiles file ``path``; a SystemExit
    naming the choices when either is unknown."""
    profiles = yaml.safe_load(path.read_text())
    if experiment not in profiles:
        raise SystemExit(f"unknown EXPERIMENT={experiment!r}; choose one of {', '.join(profiles)}")
    if profile not in profiles[experiment]:
        raise SystemExit(
            f"unknown PROFILE={profile!r} for {experiment}; "
            f"choose one of {', '.join(profiles[experiment])}"
        )
    return profiles[experiment][profile]
