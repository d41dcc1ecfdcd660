"""What ``service/``, ``gpu_workers/`` and ``schemas/`` agree on, and nothing else.

A leaf package: it imports nothing of ours (and no torch, aiohttp or marshmallow), so each side can
depend on it without depending on the other. ``batch`` is the one description of an accepted batch,
``states`` the names of worker and job states, ``failures`` why a request failed (a *reason*; only
``service/`` turns reasons into HTTP statuses).
"""
