"""Where the Hydra configs are, and composing them outside ``hydra.main`` (scripts, tests)."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, open_dict


def _config_dir() -> str:
    """``conf/`` beside the package (a source checkout or an editable install)."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "conf", here.parent / "conf"):
        if candidate.is_dir():
            return str(candidate)
    raise FileNotFoundError(f"no conf/ folder next to {here}; install with `pip install -e .`")


def compose_config(
    overrides: list[str], output_dir: str | Path, data_dir: str | Path | None = None
) -> DictConfig:
    """``conf/config.yaml`` with ``overrides``, writing into ``output_dir``, outside ``hydra.main``.

    For scripts and tests that call :func:`train` in-process (no Hydra run folder, no chdir).
    """
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=_config_dir(), version_base="1.3"):
        cfg = compose("config", overrides=list(overrides))
    with open_dict(cfg):
        cfg.paths.output_dir = str(output_dir)
        if data_dir is not None:
            cfg.paths.data_dir = str(data_dir)
    return cfg
