"""The package's default configuration, merged into dask's config system on import."""

from __future__ import annotations

from pathlib import Path

import dask.config
import yaml

#: The YAML file with the defaults, shipped inside the package.
DEFAULTS_FILE = Path(__file__).with_name("futures_hpc.yaml")

with DEFAULTS_FILE.open() as _handle:
    DEFAULTS: dict = yaml.safe_load(_handle)

dask.config.update_defaults(DEFAULTS)


def config_files_read() -> list[str]:
    """The YAML files dask's config system reads, those that exist, in the order it reads them."""
    files = []
    for location in dask.config.paths:
        path = Path(location)
        if path.is_dir():
            files.extend(str(item) for item in sorted(path.glob("*.y*ml")))
    return files
