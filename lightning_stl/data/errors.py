"""Errors raised where data enters the program."""

from __future__ import annotations

from pathlib import Path

from lightning_stl.errors import PicklableError


class DatasetNotFoundError(PicklableError, FileNotFoundError):
    """A data set is not on disk and may not (or could not) be downloaded.

    The message names the folder that was searched, the files expected there, and the setting
    that allows a download (or, with ``hint``, where to get a data set that cannot be
    downloaded), so that one reading of it tells the user what to do.
    """

    def __init__(
        self,
        name: str,
        folder: Path | str,
        expected: list[str],
        reason: str | None = None,
        hint: str | None = None,
    ) -> None:
        self._keep((name, folder, expected, reason, hint), {})
        files = ", ".join(expected)
        advice = hint or (
            "Put the files there, or set data.download=true to download them into data.root"
        )
        text = (
            f"data set '{name}' was not found in {Path(folder).resolve()} "
            f"(expected: {files}). {advice}"
        )
        if reason:
            text += f"; the download failed: {reason}"
        super().__init__(text + ".")
        self.name = name
        self.folder = Path(folder)
        self.expected = expected
