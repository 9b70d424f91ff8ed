"""blf: the Blindference compute node, built on Celery."""

__version__ = "0.1.0"
