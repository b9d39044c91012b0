"""The service templates `lmx service install` renders: the LaunchAgent (macOS) and the systemd user
unit beside it (Linux). Package data of `opta_lmx.launchd` (pyproject.toml maps this directory)."""
