"""Entry point for `serve run` / `serve deploy`: `import_path: app:build_app` (run from deploy/ray)."""

from s2ft_ray.app import build_app

__all__ = ["build_app"]
