"""Keep third-party libraries off the network (no hub, asset or telemetry calls)."""

from __future__ import annotations

import os
from pathlib import Path


def configure_offline(cache_dir: Path | None = None) -> None:
    """Set the environment that keeps timm, huggingface and ultralytics offline.

    Must run before ``ultralytics`` is imported: it reads ``YOLO_CONFIG_DIR`` at import.

    Parameters
    ----------
    cache_dir : pathlib.Path, optional
        Where ultralytics may keep its settings file. Defaults to ``./.cache/ultralytics``.
    """
    os.environ.setdefault("YOLO_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("YOLO_VERBOSE", "False")
    os.environ.setdefault("YOLO_AUTOINSTALL", "False")
    if "YOLO_CONFIG_DIR" not in os.environ:
        target = cache_dir or Path.cwd() / ".cache" / "ultralytics"
        target.mkdir(parents=True, exist_ok=True)
        os.environ["YOLO_CONFIG_DIR"] = str(target)
